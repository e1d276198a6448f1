"""The inference server (``fairseq-moe-serve``): FastAPI under uvicorn, dynamic batching,
Prometheus metrics, API keys. Needs the ``serve`` extra; ``fairseq_moe_plugin`` itself never
imports this package."""
