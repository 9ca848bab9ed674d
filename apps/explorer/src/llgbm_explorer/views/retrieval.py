"""Page file for st.navigation: the logic lives in llgbm_explorer.render.retrieval."""

from llgbm_explorer.render import retrieval

retrieval.render()
