"""make bench's Python Celery side: the no-op task, and the client loops.

    python3 -m celery -A pybench worker ...         (BROKER in the environment)
    python3 pybench.py send QUEUE N                 apply_async N times: sends_per_s
    python3 pybench.py latency QUEUE N              N apply_async + get: p50_us, p99_us
"""
import os
import sys
import time

from celery import Celery

broker = os.environ['BROKER']
app = Celery('pybench', broker=broker, backend=broker)


@app.task(name='bench.noop')
def noop():
    return None


if __name__ == '__main__':
    mode, queue, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    noop.apply_async(queue=queue + '.warm')  # connect first
    if mode == 'send':
        t0 = time.time()
        for _ in range(n):
            noop.apply_async(queue=queue)
        print('sends_per_s=%.0f' % (n / (time.time() - t0)))
    else:
        times = []
        for _ in range(n):
            t0 = time.time()
            noop.apply_async(queue=queue).get(timeout=30)
            times.append(time.time() - t0)
        times.sort()
        print('p50_us=%.0f p99_us=%.0f' % (times[int(n * 0.5)] * 1e6,
                                          times[min(n - 1, int(n * 0.99))] * 1e6))
