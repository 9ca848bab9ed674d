"""Page file for st.navigation: the logic lives in llgbm_explorer.render.delta_map."""

from llgbm_explorer.render import delta_map

delta_map.render()
