import multiprocessing as mp
import time

import requests


def req_process(i):
    r = requests.get(f"http://localhost:8000/request?x={i}")
    assert r.status_code == 200
    return r.json()


def time_parallel_requests(n):
    with mp.Pool(n) as p:
        t0 = time.time()
        p.map(req_process, range(n))
        t1 = time.time()

    return t1 - t0


if __name__ == "__main__":
    t = time_parallel_requests(10)
    print(f"It tooks {t:.3f}s to process 10 requests")
