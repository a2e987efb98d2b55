"""The peak memory a run reports is its own (sinks/health.py::peak_rss_mb): not ``ru_maxrss``, which
Linux carries over ``exec`` from the process that started it (a peer started by process 0, a run
started by a bench script holding its tape). Runs in a child of this test process, made big first."""
import subprocess
import sys

CHILD = ("import resource\n"
         "from sinks.health import peak_rss_mb\n"
         "before = peak_rss_mb()\n"
         "grown = bytearray(200 * 2**20)\n"
         "for i in range(0, len(grown), 4096):\n"
         "    grown[i] = 1\n"
         "print(before, peak_rss_mb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)\n")


def test_a_run_started_from_a_bigger_process_reports_its_own_peak():
    parent = bytearray(400 * 2**20)  # this process: > 400 MB resident when it starts the child
    for i in range(0, len(parent), 4096):
        parent[i] = 1
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True).stdout
    before, after, maxrss = map(float, out.split())
    assert maxrss >= 400  # the kernel's carried-over figure: what the summary used to report
    assert before < 200  # the child's own: the interpreter and the module's imports
    assert 190 <= after - before <= 260  # and it follows what the child itself touches
    del parent
