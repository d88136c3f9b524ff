"""The app that uvicorn reloads: edit it while `python serve.py` runs."""

from fastapi import FastAPI

app = FastAPI()


@app.get("/")
def hello() -> dict[str, str]:
    return {"message": "Hello from FastAPI"}
