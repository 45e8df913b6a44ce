import os
import time

import uvicorn
from fastapi import FastAPI

from gibbs import Hub, Worker


class MyAwesomeModel:
    def __init__(self, wait_time=0.25):
        super().__init__()
        self.w = wait_time

    def __call__(self, x):
        time.sleep(self.w)
        return x**2


# Instanciate FastAPI app and instanciate the Hub
app = FastAPI()
hub = Hub()


# Define a route that will call our model and return the result
@app.get("/request")
async def simple_request(x: int):
    return {"result": await hub.request(x)}


if __name__=="__main__":
    # Start the workers (in another process)
    workers = [Worker(MyAwesomeModel) for _ in range(4)]
    for w in workers:
        w.start()

    # Run the app (on loopback unless HOST says otherwise; the walkthrough binds 0.0.0.0)
    uvicorn.run(app, host=os.environ.get("HOST", "127.0.0.1"), port=8000)
