#!/usr/bin/env python3
"""Per-round overhead of Flower and NVIDIA FLARE, 3 sites on loopback.

Started by ./run inside the benchmark venv (needs flwr, nvflare, psutil).
Every process this script starts carries the environment variable
KAAPANA_FL_PEERS_RUN=<id>; on exit (normal, error, SIGINT/SIGTERM/SIGHUP)
all processes that carry it are stopped, so no daemon outlives the run,
including the detached ones the frameworks spawn themselves (Flower's
SuperExec, NVFlare's sub_start.sh watchdogs and job processes).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from importlib import metadata
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
MARK_VAR = "KAAPANA_FL_PEERS_RUN"
MIB = 1024 * 1024


class BenchError(RuntimeError):
    """A step failed; the message says which and where its log is."""


class Interrupted(BaseException):
    pass


def log(msg: str) -> None:
    print(f"[peers {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# process bookkeeping
# --------------------------------------------------------------------------


class Procs:
    """Starts children with a run marker and stops everything carrying it."""

    def __init__(self, mark: str, venv_bin: Path):
        self.mark = mark
        self.venv_bin = venv_bin
        self.popens: list[subprocess.Popen] = []

    def env(self, **extra: str) -> dict:
        env = dict(os.environ)
        env[MARK_VAR] = self.mark
        # Flower's SuperLink/SuperNode spawn `flower-superexec` by name.
        env["PATH"] = f"{self.venv_bin}{os.pathsep}{env.get('PATH', '')}"
        env["PYTHONUNBUFFERED"] = "1"
        env["NO_COLOR"] = "1"
        # Flower phones home by default (telemetry events, PyPI update check):
        # this benchmark must send nothing off the machine.
        env["FLWR_TELEMETRY_ENABLED"] = "0"
        env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
        env.update(extra)
        return env

    def spawn(self, argv: list[str], logfile: Path, env: dict) -> subprocess.Popen:
        f = open(logfile, "wb")  # noqa: SIM115 - closed with the process
        p = subprocess.Popen(
            argv, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env, start_new_session=True,
        )
        f.close()
        self.popens.append(p)
        return p

    def run(self, argv: list[str], logfile: Path, env: dict, timeout: float, what: str) -> str:
        """Run to completion; returns its output; raises BenchError on failure/timeout."""
        with open(logfile, "ab") as f:
            p = subprocess.Popen(
                argv, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=env, start_new_session=True,
            )
            self.popens.append(p)
            try:
                rc = p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                kill_tree(p.pid)
                raise BenchError(f"{what}: no result after {timeout:.0f} s (log: {logfile})")
        out = logfile.read_text(errors="replace")
        if rc != 0:
            raise BenchError(f"{what}: exit code {rc} (log: {logfile})\n{tail(out)}")
        return out

    def marked(self) -> list[psutil.Process]:
        me = os.getpid()
        found = []
        needle = f"{MARK_VAR}={self.mark}".encode()
        for d in Path("/proc").iterdir():
            if not d.name.isdigit() or int(d.name) == me:
                continue
            try:
                if needle in (d / "environ").read_bytes().split(b"\0"):
                    found.append(psutil.Process(int(d.name)))
            except (OSError, psutil.Error):
                continue
        return found

    def stop_all(self, grace: float = 10.0) -> int:
        procs = self.marked()
        for p in self.popens:
            try:
                if p.poll() is None:
                    procs.append(psutil.Process(p.pid))
            except psutil.Error:
                pass
        procs = list({p.pid: p for p in procs}.values())
        if not procs:
            return 0
        for p in procs:
            try:
                p.terminate()
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(procs, timeout=grace)
        for p in alive:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=5)
        # A watchdog may have respawned something in between: one more sweep.
        late = self.marked()
        for p in late:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(late, timeout=5)
        return len(procs) + len(late)


def kill_tree(pid: int) -> None:
    try:
        root = psutil.Process(pid)
        procs = root.children(recursive=True) + [root]
    except psutil.Error:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=5)


def tail(text: str, n: int = 25) -> str:
    return "\n".join("    " + line for line in text.strip().splitlines()[-n:])


class RssSampler(threading.Thread):
    """Peak of the summed RSS of each participant's process tree."""

    def __init__(self, roots_fn, period: float = 0.5):
        super().__init__(daemon=True)
        self.roots_fn = roots_fn  # () -> {participant: psutil.Process}
        self.period = period
        self.peak: dict[str, int] = {}  # summed RSS of the whole tree
        self.peak_one: dict[str, int] = {}  # largest single process of the tree
        self._stop_evt = threading.Event()

    def run(self) -> None:
        while not self._stop_evt.is_set():
            try:
                roots = self.roots_fn()
            except Exception:  # noqa: BLE001 - sampling is best effort
                roots = {}
            for name, root in roots.items():
                total = one = 0
                try:
                    for p in [root] + root.children(recursive=True):
                        try:
                            rss = p.memory_info().rss
                        except psutil.Error:
                            continue
                        total += rss
                        one = max(one, rss)
                except psutil.Error:
                    continue
                self.peak[name] = max(total, self.peak.get(name, 0))
                self.peak_one[name] = max(one, self.peak_one.get(name, 0))
            self._stop_evt.wait(self.period)

    def stop(self) -> dict:
        """Returns {"peak_rss_mib": {participant: tree MiB}, "peak_rss_largest_process_mib": {...}}."""
        self._stop_evt.set()
        self.join(timeout=5)
        mib = lambda d: {k: round(v / MIB, 1) for k, v in sorted(d.items())}  # noqa: E731
        return {"peak_rss_mib": mib(self.peak), "peak_rss_largest_process_mib": mib(self.peak_one)}


# --------------------------------------------------------------------------
# waiting helpers (poll with timeout, never a blind sleep)
# --------------------------------------------------------------------------


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def require_free(ports: list[int], system: str) -> None:
    busy = [p for p in ports if not port_free(p)]
    if busy:
        raise BenchError(
            f"{system}: port(s) {busy} on 127.0.0.1 already in use "
            f"(another run, or a leftover daemon?); free them or choose other ports")


def wait_for(cond, timeout: float, what: str, procs: list[subprocess.Popen] = (), logs=()) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        for p in procs:
            if p.poll() is not None:
                raise BenchError(f"{what}: process {p.args[0]} exited with {p.returncode} "
                                 f"(logs: {', '.join(map(str, logs))})")
        time.sleep(0.2)
    raise BenchError(f"{what}: not reached within {timeout:.0f} s (logs: {', '.join(map(str, logs))})")


def log_has(path: Path, pattern: str) -> bool:
    try:
        return re.search(pattern, path.read_text(errors="replace")) is not None
    except OSError:
        return False


# --------------------------------------------------------------------------
# result shaping
# --------------------------------------------------------------------------


def summarize(system: str, version: str, round_s: list[float], **extra) -> dict:
    further = round_s[1:]
    return {
        "system": system,
        "version": version,
        "rounds": len(round_s),
        "first_round_s": round(round_s[0], 3),
        "mean_further_round_s": round(statistics.fmean(further), 3) if further else None,
        "median_further_round_s": round(statistics.median(further), 3) if further else None,
        "stdev_further_round_s": round(statistics.stdev(further), 3) if len(further) > 1 else None,
        "total_s": round(sum(round_s), 3),
        "round_s": [round(x, 3) for x in round_s],
        **extra,
    }


# --------------------------------------------------------------------------
# Flower
# --------------------------------------------------------------------------


def bench_flower(args, procs: Procs, work: Path) -> dict:
    version = metadata.version("flwr")
    wd = work / "flower"
    home = wd / "flwr-home"
    home.mkdir(parents=True)
    link_port = args.flower_port
    node_ports = [args.flower_port + 1 + i for i in range(3)]
    require_free([link_port, *node_ports], "Flower")
    # Named SuperLink connection for `flwr run APP bench` (kept inside FLWR_HOME).
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "bench"\n\n'
        f'[superlink.bench]\naddress = "127.0.0.1:{link_port}"\ninsecure = true\n')
    env = procs.env(FLWR_HOME=str(home))
    bin_ = procs.venv_bin
    deadline = time.monotonic() + args.timeout

    def left(cap: float) -> float:
        return max(5.0, min(cap, deadline - time.monotonic()))

    t_start = time.monotonic()
    link_log = wd / "superlink.log"
    link = procs.spawn(
        [str(bin_ / "flower-superlink"), "--insecure", "--disable-runtime-dependency-installation",
         "--host", "127.0.0.1", "--port", str(link_port)],
        link_log, env)
    wait_for(lambda: log_has(link_log, r"Uvicorn running on") and not port_free(link_port),
             left(60), "Flower SuperLink start", [link], [link_log])

    nodes, node_logs = [], []
    for i, port in enumerate(node_ports):
        lg = wd / f"supernode-{i}.log"
        node_logs.append(lg)
        nodes.append(procs.spawn(
            [str(bin_ / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{link_port}",
             "--host", "127.0.0.1", "--port", str(port),
             "--node-config", f"partition-id={i} num-partitions=3"],
            lg, env))
    wait_for(lambda: all(log_has(lg, r"SuperNode ID: \d+") for lg in node_logs),
             left(90), "Flower SuperNodes registering", [link, *nodes], [link_log, *node_logs])
    startup_s = time.monotonic() - t_start

    roots = {"server": psutil.Process(link.pid)}
    roots.update({f"client-{i}": psutil.Process(n.pid) for i, n in enumerate(nodes)})
    sampler = RssSampler(lambda: roots)
    sampler.start()

    timings = wd / "timings.json"
    run_log = wd / "flwr-run.log"
    log(f"Flower {version}: SuperLink + 3 SuperNodes up in {startup_s:.1f} s; running {args.rounds} rounds")
    t_submit = time.monotonic()
    out = procs.run(
        [str(bin_ / "flwr"), "run", str(HERE / "flower_app"), "bench", "--stream",
         "--run-config", f"num-server-rounds={args.rounds} min-nodes=3 timings-out=\"{timings}\""],
        run_log, env, timeout=left(args.timeout), what="Flower `flwr run`")
    job_wall_s = time.monotonic() - t_submit
    rss = sampler.stop()
    if not timings.exists():
        raise BenchError(f"Flower: run ended without timings (ServerApp failed?) (log: {run_log})\n{tail(out)}")
    data = json.loads(timings.read_text())
    rounds = data["rounds"]
    if len(rounds) != args.rounds or any(r.get("replies") != 3 for r in rounds):
        raise BenchError(f"Flower: expected {args.rounds} rounds with 3 replies each, got {rounds} (log: {run_log})")
    round_s, prev = [], rounds[0]["configure"]
    for r in rounds:
        round_s.append(r["aggregated"] - prev)
        prev = r["aggregated"]
    m = re.search(r"started run (\d+)", out)
    return summarize(
        "Flower", version, round_s,
        deployment="flower-superlink + 3x flower-supernode (subprocess isolation), `flwr run`, HTTP on loopback",
        strategy="FedAvg (min 3 nodes, fraction_evaluate=0), no-op ClientApp train()",
        startup_s=round(startup_s, 2), job_wall_s=round(job_wall_s, 2),
        **rss, run_id=m.group(1) if m else None,
    )


# --------------------------------------------------------------------------
# NVIDIA FLARE
# --------------------------------------------------------------------------

NVF_PARTICIPANT_RE = re.compile(r"nvflare\.private\.fed\.app\.(?:server\.server_train|client\.client_train)"
                                r" .*?-m \S*/prod_\d+/([^/\s]+)")


def bench_nvflare(args, procs: Procs, work: Path) -> dict:
    version = metadata.version("nvflare")
    wd = work / "nvflare"
    home = wd / "home"  # NVFlare keeps its CLI config in ~/.nvflare: keep it out of the real HOME
    poc = wd / "poc"
    home.mkdir(parents=True)
    require_free([8002, 8003], "NVFlare (POC default fed_learn/admin ports)")
    env = procs.env(HOME=str(home), NVFLARE_POC_WORKSPACE=str(poc))
    nvflare = str(procs.venv_bin / "nvflare")
    deadline = time.monotonic() + args.timeout
    cli_log = wd / "nvflare-cli.log"

    def left(cap: float) -> float:
        return max(5.0, min(cap, deadline - time.monotonic()))

    procs.run([nvflare, "poc", "prepare", "-n", "3", "--force"], cli_log, env, left(120),
              "NVFlare `poc prepare -n 3`")
    t_start = time.monotonic()
    args._nvflare_env = env  # for the stop in main()'s cleanup
    out = procs.run([nvflare, "poc", "start", "--timeout", "90"], cli_log, env, left(150),
                    "NVFlare `poc start`")
    if not re.search(r"Clients ready: 3/3", out):
        raise BenchError(f"NVFlare: `poc start` did not report 3/3 clients ready (log: {cli_log})\n{tail(out)}")
    startup_s = time.monotonic() - t_start

    def roots():
        found = {}
        for p in procs.marked():
            try:
                m = NVF_PARTICIPANT_RE.search(" ".join(p.cmdline()))
            except psutil.Error:
                continue
            if m:
                name = m.group(1)
                found["server" if name == "server" else f"client-{name}"] = p
        return found

    sampler = RssSampler(roots)
    sampler.start()

    job = wd / "job"
    shutil.copytree(HERE / "nvflare_job", job)
    timings = wd / "timings.json"
    cfg_path = job / "app" / "config" / "config_fed_server.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["workflows"][0]["args"]["num_rounds"] = args.rounds
    for c in cfg["components"]:
        if c["id"] == "round_timer":
            c["args"]["out_path"] = str(timings)
    cfg_path.write_text(json.dumps(cfg, indent=2))

    log(f"NVFlare {version}: POC server + 3 clients up in {startup_s:.1f} s; running {args.rounds} rounds")
    t_submit = time.monotonic()
    out = procs.run([nvflare, "job", "submit", "-j", str(job)], cli_log, env, left(120), "NVFlare `job submit`")
    m = re.findall(r"job_id:\s*([0-9a-f-]{36})", out)
    if not m:
        raise BenchError(f"NVFlare: no job_id in `job submit` output (log: {cli_log})\n{tail(out)}")
    job_id = m[-1]
    wait_s = left(args.timeout)
    out = procs.run([nvflare, "job", "wait", job_id, "--timeout", str(int(wait_s))], cli_log, env,
                    wait_s + 30, "NVFlare `job wait`")
    job_wall_s = time.monotonic() - t_submit
    rss = sampler.stop()
    status = re.findall(rf"Job {job_id} status: (\S+)", out)
    if not status or status[-1] != "COMPLETED":
        raise BenchError(f"NVFlare: job {job_id} ended as {status[-1] if status else '?'} "
                         f"(log: {cli_log}; server log under {poc})\n{tail(out)}")
    if not timings.exists():
        raise BenchError(f"NVFlare: job completed without timings (log: {cli_log}; workspace {poc})")
    data = json.loads(timings.read_text())
    rounds = sorted(data["rounds"].values(), key=lambda r: r["round"])
    if len(rounds) != args.rounds or any("done" not in r for r in rounds):
        raise BenchError(f"NVFlare: expected {args.rounds} finished rounds, got {rounds}")
    round_s, prev = [], rounds[0]["started"]
    for r in rounds:
        round_s.append(r["done"] - prev)
        prev = r["done"]
    return summarize(
        "NVFlare", version, round_s,
        deployment="POC mode (`nvflare poc prepare -n 3` / `poc start`), server + 3 clients, gRPC on loopback",
        strategy="ScatterAndGather (min 3 clients) + InTimeAccumulateWeightedAggregator, no-op Executor",
        startup_s=round(startup_s, 2), job_wall_s=round(job_wall_s, 2),
        **rss, job_id=job_id,
    )


def stop_nvflare(args, procs: Procs) -> None:
    env = getattr(args, "_nvflare_env", None)
    if env is None:
        return
    args._nvflare_env = None
    try:
        p = subprocess.run([str(procs.venv_bin / "nvflare"), "poc", "stop"], env=env, timeout=60,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        if p.returncode != 0:
            log(f"NVFlare `poc stop` exit {p.returncode}; killing its processes instead")
    except subprocess.TimeoutExpired:
        log("NVFlare `poc stop` timed out; killing its processes instead")


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------


def fmt(x, nd=2):
    return "-" if x is None else f"{x:.{nd}f}"


def table(results: list[dict]) -> str:
    head = ["system", "version", "rounds", "first round s", "mean further round s", "total s",
            "peak RSS MiB server / clients: tree (largest process)"]
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["system"], r.get("version", "?"), "-", "FAILED", "-", "-", "-"])
            continue
        def span(d):
            srv = d.get("server")
            cl = [v for k, v in d.items() if k != "server"]
            return f"{srv:.0f} / {min(cl):.0f}-{max(cl):.0f}" if srv is not None and cl else "-"

        rss_s = f"{span(r.get('peak_rss_mib') or {})} ({span(r.get('peak_rss_largest_process_mib') or {})})"
        rows.append([r["system"], r["version"], str(r["rounds"]), fmt(r["first_round_s"]),
                     fmt(r["mean_further_round_s"]), fmt(r["total_s"]), rss_s])
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    sep = "|-" + "-|-".join("-" * w for w in widths) + "-|"
    return "\n".join([line(head), sep, *(line(r) for r in rows)])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--json", default="/tmp/kaapana-fl-peers.json", help="where to write the results")
    ap.add_argument("--systems", default="flower,nvflare", help="comma list: flower,nvflare")
    ap.add_argument("--timeout", type=float, default=None,
                    help="per-system limit in s (default 120 + 12*rounds, at most 600)")
    ap.add_argument("--flower-port", type=int, default=19380,
                    help="SuperLink HTTP port; SuperNodes use the next 3 (default 19380)")
    ap.add_argument("--workdir", default=None, help="keep logs and workspaces here (default: temp, removed on success)")
    ap.add_argument("--venv-bin", default=str(Path(sys.executable).parent))
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    if args.timeout is None:
        args.timeout = min(600.0, 120.0 + 12.0 * args.rounds)
    systems = [s.strip().lower() for s in args.systems.split(",") if s.strip()]
    unknown = set(systems) - {"flower", "nvflare"}
    if unknown:
        ap.error(f"unknown system(s): {sorted(unknown)}")

    mark = os.environ.get("KAAPANA_FL_PEERS_MARK") or uuid.uuid4().hex
    procs = Procs(mark, Path(args.venv_bin))
    keep = args.workdir is not None
    work = Path(args.workdir or tempfile.mkdtemp(prefix="kaapana-fl-peers."))
    work.mkdir(parents=True, exist_ok=True)

    def on_signal(signum, _frame):
        raise Interrupted(signal.Signals(signum).name)

    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, on_signal)

    results, failed = [], False
    t0 = time.monotonic()
    load_start = os.getloadavg()
    if load_start[0] > 1.0:
        log(f"warning: load average {load_start[0]:.1f} on {os.cpu_count()} CPUs before the start; "
            "round times (Flower's above all, which move in 3 s steps) will be inflated")
    try:
        for system in systems:
            fn = bench_flower if system == "flower" else bench_nvflare
            try:
                t = time.monotonic()
                res = fn(args, procs, work)
                res["system_wall_s"] = round(time.monotonic() - t, 1)
                results.append(res)
            except BenchError as e:
                failed = True
                log(f"FAILED: {e}")
                name = "Flower" if system == "flower" else "NVFlare"
                try:
                    ver = metadata.version("flwr" if system == "flower" else "nvflare")
                except metadata.PackageNotFoundError:
                    ver = "?"
                results.append({"system": name, "version": ver, "error": str(e)})
            finally:
                if system == "nvflare":
                    stop_nvflare(args, procs)
                n = procs.stop_all()
                if n:
                    log(f"{system}: stopped its {n} process(es)")
    except Interrupted as e:
        log(f"interrupted ({e}); stopping everything")
        stop_nvflare(args, procs)
        procs.stop_all(grace=5)
        return 130
    finally:
        stop_nvflare(args, procs)
        procs.stop_all(grace=5)

    report = {
        "benchmark": "kaapana-node benches/peers: per-round overhead, no-op train step, 3 sites on loopback",
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": {"cpus": os.cpu_count(), "python": sys.version.split()[0],
                 "loadavg_1m_start": round(load_start[0], 2), "loadavg_1m_end": round(os.getloadavg()[0], 2)},
        "rounds_requested": args.rounds,
        "wall_s": round(time.monotonic() - t0, 1),
        "results": results,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(table(results))
    print(f"\nJSON: {args.json}   (benchmark wall time {report['wall_s']:.1f} s)")
    if failed or keep:
        print(f"logs and workspaces: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
