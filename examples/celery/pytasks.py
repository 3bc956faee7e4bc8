"""Python's half of the Celery example: tasks a Squall program calls, and,
run as a script, a Python client calling the Lua tasks in tasks/.

    python3 -m celery -A pytasks worker --pool=solo -Q celery   (./run does it)
    /usr/bin/python3 pytasks.py                                  (Python calls Lua)
"""
import os
import time

from celery import Celery

broker = os.environ.get('BROKER', 'redis://127.0.0.1:6379/0')
app = Celery('pytasks', broker=broker, backend=broker)


@app.task(name='pytasks.add')
def add(x, y):
    return x + y


@app.task(name='pytasks.slow_square')
def slow_square(n):
    time.sleep(1)
    return n * n


if __name__ == '__main__':
    # Lua tasks run on the Squall worker, which serves the queue "lua"
    words = app.send_task('text.words', args=['the quick brown fox jumps'],
                          kwargs={'min_length': 4}, queue='lua')
    print('text.words ->', words.get(timeout=10))
    shout = app.send_task('text.shout', args=['hello from python'], queue='lua')
    print('text.shout ->', shout.get(timeout=10))
    empty = app.send_task('text.shout', args=[''], queue='lua')
    try:
        empty.get(timeout=10)
    except Exception as e:
        print('text.shout("") raised', type(e).__name__ + ':', e)
