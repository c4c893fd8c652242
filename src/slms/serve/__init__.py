"""`slms serve`: an OpenAI-compatible HTTP server (protocol, scheduler, app) with a batching
scheduler and a browser playground that shows the experts each token went to.

The HTTP stack (starlette, uvicorn) is the optional extra `slms[serve]`; `decode` and
`scheduler` need only torch.
"""
