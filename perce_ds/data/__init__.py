"""Data: PersonaRecord sources, benchmark adapters, retrieval, prompt building, tokenised caches.

The benchmark adapters register their tasks in perce_ds.data.tasks.TASKS when imported; they are imported
here, so the registry is complete whichever perce_ds.data module a caller imports first (prompt building
looks a record's task up there by name).
"""

from perce_ds.data import lamp, longlamp  # noqa: F401  (registers the LaMP and LongLaMP tasks)
