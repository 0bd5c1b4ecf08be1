"""``cfcd serve``: search by photo, browse an index and explore a benchmark, in a web page.

* :mod:`cfcd.serve.service`: :class:`SearchService` (the index, its model, queries described as
  the database was), the image root that never serves outside itself, upload limits;
* :mod:`cfcd.serve.benchmark`: the benchmark and comparison views (numbers of ``cfcd evaluate``);
* :mod:`cfcd.serve.thumbs`: thumbnails made on demand and cached on disk;
* :mod:`cfcd.serve.app`: the FastAPI app (:func:`create_app`) and the static page in ``static/``.

FastAPI and uvicorn are the ``serve`` extra: ``pip install 'cfcd[serve]'``.
"""

from cfcd.serve.service import Limits, QueryImage, RequestError, SearchService

__all__ = ["Limits", "QueryImage", "RequestError", "SearchService"]
