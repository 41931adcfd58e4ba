"""The README's deployment walk-through, run exactly as written: every ``bash host=NAME`` block
on its host (a network namespace at the README's address; ``ca`` is offline, outside them),
in its own folder, with ``scp`` copying between the hosts' folders."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from medmpc.netlab.hosts import Network, unavailable

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(unavailable() is not None, reason=f"no separate hosts here: {unavailable()}"),
]

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^```bash host=(\w+)(?: (background|service))?\n(.*?)^```$", re.M | re.S)
# the order gives the addresses: host i is at 198.18.<i+1>.2, as the README's table says
HOSTS = ["coordinator", "aggregator0", "aggregator1", "hospital0", "hospital1", "hospital2"]
HOSTS += ["owner", "compute", "dealer", "clinic"]

SCP = """#!{python}
# the test's stand-in for scp between hosts: SOURCE... HOST:DEST copies into HOST's folder
import shutil, sys
from pathlib import Path
*sources, target = sys.argv[1:]
host, _, dest = target.partition(":")
where = Path({hosts!r}) / host / dest
if not dest or dest.endswith("/"):
    where.mkdir(parents=True, exist_ok=True)
for source in sources:
    shutil.copy(source, where)
"""


def walkthrough() -> list[tuple[str, str, str]]:
    """(host, how, script) of every block, in the README's order."""
    return [(m[1], m[2] or "", m[3]) for m in BLOCK.finditer((ROOT / "README.md").read_text())]


def test_the_readme_walkthrough_names_every_host_and_address():
    readme = (ROOT / "README.md").read_text()
    blocks = walkthrough()
    assert {host for host, _, _ in blocks} == {"ca", *HOSTS}
    for i, host in enumerate(HOSTS):  # the table row naming the host gives its address
        assert re.search(rf"^\| [^|]*\b{host}\b[^|]*\| [^|]*\b198\.18\.{i + 1}\.2\b", readme, re.M), host


def test_the_readme_walkthrough_runs_on_separate_hosts(tmp_path):
    hosts_dir, bin_dir = tmp_path / "hosts", tmp_path / "bin"
    for host in ["ca", *HOSTS]:
        (hosts_dir / host).mkdir(parents=True)
    bin_dir.mkdir()
    (bin_dir / "scp").write_text(SCP.format(python=sys.executable, hosts=str(hosts_dir)))
    (bin_dir / "scp").chmod(0o755)
    Image.effect_noise((64, 64), 40).save(hosts_dir / "clinic" / "xray.png")  # the clinic's X-ray
    env = {**os.environ, "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}"}
    running: dict[str, tuple[subprocess.Popen, str, Path]] = {}

    def log_of(host: str) -> str:
        return (tmp_path / f"{host}.log").read_text(errors="replace")[-3000:]

    with Network(HOSTS, profile="unshaped") as net:
        try:
            for host, how, script in walkthrough():
                argv = ["bash", "-euo", "pipefail", "-c", script]
                with open(tmp_path / f"{host}.log", "ab") as log:
                    proc = subprocess.Popen(
                        argv if host == "ca" else net.command(host, argv),
                        cwd=hosts_dir / host,
                        env=env,
                        stdout=subprocess.PIPE if host == "clinic" else log,
                        stderr=log,
                        start_new_session=True,
                    )
                if how:
                    running[host] = (proc, how, hosts_dir / host)
                    continue
                out, _ = proc.communicate(timeout=600)
                assert proc.returncode == 0, f"{host}: exit {proc.returncode}\n{log_of(host)}"
                for name, (bg, kind, _) in running.items():
                    if kind == "background":  # the federated roles end with the coordinator
                        assert bg.wait(timeout=120) == 0, f"{name}: exit {bg.returncode}\n{log_of(name)}"
                running = {n: r for n, r in running.items() if r[1] == "service"}
            [prediction] = json.loads(out)["predictions"]
            assert prediction["prediction"] in ("normal", "bacterial", "viral")
            for name, (svc, _, _) in running.items():
                assert svc.poll() is None, f"{name} stopped: {log_of(name)}"
            report = json.loads((hosts_dir / "coordinator" / "results" / "report.json").read_text())
            assert report["mode"] == "secure" and len(report["rounds"]) == 2
            # each host got its own key only
            assert sorted(p.name for p in (hosts_dir / "hospital1" / "pki").iterdir()) == [
                "ca.pem", "crl.pem", "hospital1.key", "hospital1.pem", "plan.json"
            ]  # fmt: skip
        finally:
            for proc, _, _ in running.values():
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
