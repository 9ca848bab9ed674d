"""llgbm-explorer: a Streamlit dashboard over what the llgbm command line wrote.

    just explorer --world worlds/tiny --runs runs       # = llgbm-explorer ..., on 127.0.0.1:8501

Pages: delta map, similarity, cluster quality, composition, retrieval, runs. Readers
(``data``), page logic (``analysis``, ``render``) and the checked folders (``folders``) are
plain modules, importable and tested without a browser; ``app.py`` is the Streamlit entry point.
"""

__version__ = "0.1.0"

# (page file in views/ and module in render/, title, icon); the first is the default page at "/".
PAGES = (
    ("delta_map", "Delta map", ":material/scatter_plot:"),
    ("similarity", "Similarity", ":material/grid_on:"),
    ("clusters", "Cluster quality", ":material/bubble_chart:"),
    ("composition", "Composition", ":material/join:"),
    ("retrieval", "Retrieval", ":material/search:"),
    ("runs", "Runs", ":material/monitoring:"),
)
