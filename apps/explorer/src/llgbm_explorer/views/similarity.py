"""Page file for st.navigation: the logic lives in llgbm_explorer.render.similarity."""

from llgbm_explorer.render import similarity

similarity.render()
