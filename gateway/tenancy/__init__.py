"""Who is calling, and what their ``model`` names: API keys to tenants, names to adapter
versions (``directory``), how long those answers are trusted (``freshness``: TTL caches
confirmed by the registry's change counter), and the registry's pushed change notices
(``invalidation``)."""
