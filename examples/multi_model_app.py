import os
import time

import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel

from gibbs import Hub, Worker


class TextModel:
    """A toy text model: 20 ms per call."""

    def __init__(self, wait_time=0.02):
        self.w = wait_time

    def __call__(self, text):
        time.sleep(self.w)
        return {"upper": text.upper(), "words": len(text.split())}


class ImageModel:
    """A toy image model: an image is a list of rows of grey levels (0-255)."""

    def __init__(self, wait_time=0.05):
        self.w = wait_time

    def __call__(self, pixels):
        time.sleep(self.w)
        values = [v for row in pixels for v in row]
        return {
            "height": len(pixels),
            "width": len(pixels[0]) if pixels else 0,
            "mean": sum(values) / len(values) if values else 0.0,
        }


class Image(BaseModel):
    pixels: list[list[float]]


# Instanciate FastAPI app and one Hub for both models
APP_PORT = int(os.environ.get("APP_PORT", 8000))
HUB_PORT = int(os.environ.get("HUB_PORT", 5019))
app = FastAPI()
hub = Hub(port=HUB_PORT)


# Each route names the model it wants: only that model's workers get the request
@app.get("/text")
async def text(q: str):
    return await hub.request(q, gibbs_model="text")


@app.post("/image")
async def image(img: Image):
    return await hub.request(img.pixels, gibbs_model="image")


@app.get("/models")
async def models():
    return hub.models()


if __name__ == "__main__":
    # Start the workers (in other processes): 2 for each model
    workers = [Worker(TextModel, gibbs_model="text", gibbs_port=HUB_PORT) for _ in range(2)]
    workers += [Worker(ImageModel, gibbs_model="image", gibbs_port=HUB_PORT) for _ in range(2)]
    for w in workers:
        w.start()

    # Run the app
    uvicorn.run(app, host=os.environ.get("HOST", "127.0.0.1"), port=APP_PORT)
