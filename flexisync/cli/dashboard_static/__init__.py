"""The ``flexisync dashboard`` page: ``index.html``, ``dashboard.js``, ``dashboard.css``.

Plain files served as they are (no build step, nothing fetched from elsewhere), read
with :mod:`importlib.resources` by :mod:`flexisync.cli._dashboard`.
"""
