"""The Streamlit entry point: ``streamlit run app.py -- --world DIR --runs DIR`` (or ``just explorer``).

Sets the session's folders from the command line, draws the sidebar and hands over to the page
chosen in the navigation. Page files are in ``views/``; their logic in ``llgbm_explorer.render``.
"""

from pathlib import Path

import streamlit as st

from llgbm_explorer import PAGES, ui

VIEWS = Path(__file__).parent / "views"

st.set_page_config(page_title="llgbm explorer", layout="wide")
with ui.friendly():
    ui.folders()
page = st.navigation(
    [
        # The first page is the default one and lives at "/".
        st.Page(
            VIEWS / f"{name}.py",
            title=title,
            icon=icon,
            url_path=name if i else None,
            default=i == 0,
        )
        for i, (name, title, icon) in enumerate(PAGES)
    ]
)
ui.sidebar()
page.run()
