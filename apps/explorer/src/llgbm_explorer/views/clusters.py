"""Page file for st.navigation: the logic lives in llgbm_explorer.render.clusters."""

from llgbm_explorer.render import clusters

clusters.render()
