"""Page file for st.navigation: the logic lives in llgbm_explorer.render.runs."""

from llgbm_explorer.render import runs

runs.render()
