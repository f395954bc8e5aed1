"""The one atomic writer: concurrent writers of one file, and leftovers of killed writers."""
import os
import subprocess
import sys
import time

from aff_zoo.utils import atomic_write_text

WRITER = '''
import sys, time
from aff_zoo.utils import atomic_write
def write(tmp):
    with open(tmp, "w") as f:
        for _ in range(200):
            f.write(sys.argv[2] * 100 + "\\n")
start = float(sys.argv[3])
while time.time() < start:   # both writers start together, after their slow imports
    time.sleep(0.001)
for _ in range(300):
    atomic_write(sys.argv[1], write)
'''


def test_concurrent_writers_of_one_file(tmp_path):
    """Two processes rewriting one file (as two DDP ranks filling one cache): no crash, no mixed content."""
    target = str(tmp_path / 'cache.npz')
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    start = str(time.time() + 8)
    procs = [subprocess.Popen([sys.executable, '-c', WRITER, target, ch, start], cwd=root, stderr=subprocess.PIPE, text=True)
             for ch in 'ab']
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read()
    lines = set(open(target).read().splitlines())
    assert lines in ({'a' * 100}, {'b' * 100})
    assert os.listdir(tmp_path) == ['cache.npz']


def test_leftover_of_a_killed_writer_is_removed(tmp_path):
    target = tmp_path / 'log.json'
    dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'], capture_output=True, text=True)
    stale = tmp_path / f'log.json.{int(dead.stdout)}.tmp'
    stale.write_text('half')
    other = tmp_path / 'other.json.1.tmp'   # another file's temporary is not ours to remove
    other.write_text('x')
    atomic_write_text(str(target), 'whole')
    assert target.read_text() == 'whole'
    assert sorted(os.listdir(tmp_path)) == ['log.json', 'other.json.1.tmp']
