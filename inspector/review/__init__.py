"""The loop back from the line: the parts it flagged (and a sample of those it passed) kept in a database,
reviewed on a web page, and handed to ``pipelines review-export`` as golden references and training defects.

- :mod:`~inspector.review.settings`: ``RecordingSettings`` (``INSPECTOR_RECORD_*``)
- :mod:`~inspector.review.schema`: the tables; :mod:`~inspector.review.migrations`: their Alembic migrations
- :mod:`~inspector.review.store`: ``ReviewStore``, the one way in and out of the database
- :mod:`~inspector.review.recorder`: the bounded queue and background writer (never slows a scoring request)
- :mod:`~inspector.review.retention`: what to purge, by age and disk budget
- :mod:`~inspector.review.estimates`: the line's false-reject and escape rates from the reviews
- :mod:`~inspector.review.metrics`: those numbers on ``/metrics``
- :mod:`~inspector.review.pages`: the ``/review`` page and its JSON API; :mod:`~inspector.review.hook`: the one
  call the scoring route and ``inspector score --record`` make; :mod:`~inspector.review.context`: one app's parts

Needs the ``serve`` extra (SQLAlchemy, Alembic, FastAPI); ``import inspector`` never imports this package.
"""
