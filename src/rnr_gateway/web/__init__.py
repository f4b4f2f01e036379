"""HTTP + WebSocket surface (Starlette, served by uvicorn inside the gateway's loop)."""
