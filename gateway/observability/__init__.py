"""What the gateway tells operators and routers: Prometheus metrics (``metrics``), logs
with request and tenant context (``logs``), and the model-server protocol routers and
endpoint pickers scrape (``msp``)."""
