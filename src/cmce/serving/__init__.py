"""The online side, `cmce serve`: state (the served query model and index, their reloads), queries (one
request checked and answered), app (the HTTP API), server (start-up checks, then uvicorn)."""
