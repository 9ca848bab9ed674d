"""Page file for st.navigation: the logic lives in llgbm_explorer.render.composition."""

from llgbm_explorer.render import composition

composition.render()
