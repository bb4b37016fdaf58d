"""Failures at scale: torchrun restarts that resume, a rank that diverges or hangs alone,
SIGTERM in an epoch's last step, ranks that agree in time-driven runs, DDP's buckets under
torch.compile, two nodes on one machine, and tuning workers sharing a real PostgreSQL.

Every test bounds its own time; the runs are quarter-width networks on 200 images.
"""

import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import tiny_batches, tiny_config, write_archive

from fastmbv1 import augment, interrupts
from fastmbv1 import train as train_module
from fastmbv1.errors import Interrupted
from fastmbv1.train import train

# Fixed epochs, a checkpoint and an evaluation after each: 6 steps an epoch (200 images / 32).
FLAGS = [
    "--device", "cpu", "--preset", "cpu", "--width", "0.25", "--batch-size", "32",
    "--eval-batch-size", "20", "--pipeline", "torch", "--epochs", "2", "--budget", "100000",
    "--checkpoint-every", "1", "--keep", "10", "--eval-every", "1",
]  # fmt: skip
STEPS_PER_EPOCH = 6
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def records(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def weights(path: Path) -> dict:
    return torch.load(path, weights_only=True)["state_dict"]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def start_logged(cmd: list, log: Path, **kw) -> subprocess.Popen:
    """Start ``cmd`` with its output in ``log``, in a process group of its own (torchrun's
    workers included), which ``end`` kills whole."""
    with open(log, "w") as f:
        cmd = list(map(str, cmd))
        return subprocess.Popen(
            cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True, **kw
        )


def end(*procs: subprocess.Popen) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()


def run_logged(cmd: list, log: Path, timeout: float, **kw) -> int:
    """Run ``cmd`` to its end, with its output in ``log``; its exit status."""
    p = start_logged(cmd, log, **kw)
    try:
        return p.wait(timeout=timeout)
    finally:
        end(p)


@pytest.fixture(scope="module")
def scale(tmp_path_factory):
    """A tiny archive and a cache shared by this module's runs."""
    root = tmp_path_factory.mktemp("scale")
    data = write_archive(root / "tiny.tar.gz", tiny_batches(per_batch=40))
    return root, data, {**os.environ, "FASTMBV1_CACHE": str(root / "cache")}


@pytest.fixture(scope="module")
def reference(scale) -> Path:
    """The uninterrupted run: one torchrun agent, two processes (OMP_NUM_THREADS=1 each)."""
    root, data, env = scale
    out = root / "reference"
    cmd = [*TORCHRUN, "--standalone", "--nproc-per-node", "2", "-m", "fastmbv1", "train"]
    code = run_logged([*cmd, *FLAGS, "--data", data, "--out", out], root / "ref.log", 600, env=env)
    assert code == 0, (root / "ref.log").read_text()[-3000:]
    return out


# Rank 1 of torchrun's first round dies (SIGKILL) in the 2nd step of epoch 2, after the
# epoch-1 checkpoint.
KILLER = f"""
import os, signal, sys
from fastmbv1 import augment
from fastmbv1.cli import main
if os.environ["RANK"] == "1" and os.environ["TORCHELASTIC_RESTART_COUNT"] == "0":
    real, calls = augment.mixed_loss, []
    def dying(*args):
        calls.append(1)
        if len(calls) == {STEPS_PER_EPOCH + 2}:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args)
    augment.mixed_loss = dying
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.timeout(1200)
def test_a_restarted_group_resumes_and_ends_as_the_uninterrupted_run(scale, reference):
    root, data, env = scale
    entry, out, log = root / "killer.py", root / "restarted", root / "restarted.log"
    entry.write_text(KILLER)
    cmd = [
        *TORCHRUN, "--nproc-per-node", "2", "--max-restarts", "1",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
        entry, "train", *FLAGS, "--data", data, "--out", out,
    ]  # fmt: skip
    code = run_logged(cmd, log, 600, env=env)
    text = log.read_text()
    assert code == 0, text[-3000:]
    assert "exitcode: -9" in text and f"resuming {out} after epoch 1" in text, text[-3000:]
    assert [x["epoch"] for x in records(out)] == [1, 2]
    assert_same_weights(out / "final.pt", reference / "final.pt")


@pytest.mark.timeout(120)
def test_a_restarted_round_meets_in_its_own_store_not_a_dead_rounds(monkeypatch):
    """What the dead round left in torchrun's store cannot mislead the next one: an address
    whose rank 0 is gone, or a live store that answers with another token."""
    import threading
    from datetime import timedelta

    import torch.distributed as dist

    from fastmbv1.distributed import ROUND_KEY, round_store

    agent = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(agent.port))
    other = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    other.set(ROUND_KEY, "another-token")
    timeout = timedelta(seconds=30)
    for stale in (f"{free_port()} dead-round-token", f"{other.port} dead-round-token"):
        agent.set(ROUND_KEY, stale)
        found = []
        late = threading.Thread(target=lambda f=found: f.append(round_store(1, 2, timeout)))
        late.start()  # rank 1 reads the stale address before rank 0 announces a new one
        time.sleep(1.0)
        mine = round_store(0, 2, timeout)
        late.join(timeout=60)
        assert found, "rank 1 never found this round's store"
        found[0].set("hello", "from rank 1")
        assert mine.get("hello") == b"from rank 1"


@pytest.mark.timeout(1200)
def test_two_nodes_on_one_machine_equal_two_processes(scale, reference):
    root, data, env = scale
    out, port = root / "two-nodes", free_port()
    # torchrun pins OMP_NUM_THREADS=1 only with more than one process per node: pin it here
    # too, or the nodes compute with other thread counts (and other rounding) than reference.
    env = {**env, "OMP_NUM_THREADS": "1"}
    agents = []
    for node in (0, 1):
        cmd = [
            *TORCHRUN, "--nnodes", "2", "--node-rank", str(node), "--nproc-per-node", "1",
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
            "--rdzv-id", "two-nodes", "-m", "fastmbv1", "train",
            *FLAGS, "--data", data, "--out", out,
        ]  # fmt: skip
        agents.append(start_logged(cmd, root / f"node{node}.log", env=env))
    try:
        codes = [a.wait(timeout=600) for a in agents]
    finally:
        end(*agents)
    logs = "\n".join((root / f"node{n}.log").read_text()[-2000:] for n in (0, 1))
    assert codes == [0, 0], logs
    assert_same_weights(out / "final.pt", reference / "final.pt")


@pytest.fixture
def data(tmp_path):
    return write_archive(tmp_path / "tiny.tar.gz", tiny_batches(per_batch=40))


@pytest.mark.timeout(600)
def test_resume_auto_starts_afresh_or_repeats_a_final_exit(tmp_path, data, monkeypatch, capsys):
    from fastmbv1.cli import main

    out = tmp_path / "run"
    args = ["train", *FLAGS, "--epochs", "1", "--data", str(data), "--out", str(out)]
    # What a first session that died in epoch 1 leaves: its config, no checkpoint.
    out.mkdir()
    (out / "config.json").write_text("{}")
    assert main(args) == 2 and "already holds a run" in capsys.readouterr().err
    assert main([*args, "--resume", "auto"]) == 0  # afresh
    assert [r["epoch"] for r in records(out)] == [1]
    assert main([*args, "--resume", "auto"]) == 2
    assert "holds a finished run" in capsys.readouterr().err
    # torchrun restarted a session that had ended with status 4 (or 3): the same at once.
    (out / "summary.json").unlink()
    note = {"status": 4, "error": "loss became nan at step 9 on rank 1", "run_id": "job"}
    (out / "exit.json").write_text(json.dumps(note))
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")
    assert main(args) == 4
    err = capsys.readouterr().err.strip()
    assert err == "fastmbv1 train: error: not restarted: loss became nan at step 9 on rank 1"
    note["status"] = 3
    (out / "exit.json").write_text(json.dumps(note))
    assert main(args) == 3
    # A restart of another torchrun job goes on: here afresh, as no checkpoint is left.
    for p in out.glob("checkpoint-*.pt"):
        p.unlink()
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "another-job")
    assert main(args) == 0 and not (out / "exit.json").exists()
    assert [r["epoch"] for r in records(out)] == [1]


def start_ranks(args: list, tmp_path: Path, code: str | None = None) -> list[subprocess.Popen]:
    """Two ranks of ``fastmbv1 args`` (or of ``python -c code args``) that meet as torchrun's
    would, without an agent: nothing restarts them."""
    port, procs = free_port(), []
    for rank in (0, 1):
        env = {
            **os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1",
        }  # fmt: skip
        head = ["-c", code] if code else ["-m", "fastmbv1"]
        cmd = [sys.executable, *head, *map(str, args)]
        logs = (tmp_path / f"rank{rank}.out", tmp_path / f"rank{rank}.err")
        with open(logs[0], "w") as out, open(logs[1], "w") as err:
            procs.append(subprocess.Popen(cmd, stdout=out, stderr=err, env=env))
    return procs


def stderr_of(tmp_path: Path, rank: int) -> str:
    return (tmp_path / f"rank{rank}.err").read_text()


# Rank 1's loss becomes NaN in the 3rd step of epoch 2; DDP then spreads NaN to rank 0 too.
POISON = f"""
import os, sys
from fastmbv1 import augment
from fastmbv1.cli import main
if os.environ["RANK"] == "1":
    real, calls = augment.mixed_loss, []
    def poisoned(*args):
        calls.append(1)
        loss = real(*args)
        return loss * float("nan") if len(calls) == {STEPS_PER_EPOCH + 3} else loss
    augment.mixed_loss = poisoned
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.timeout(600)
def test_a_nan_on_one_rank_stops_every_rank_at_one_step_with_status_4(tmp_path, data):
    out = tmp_path / "run"
    args = ["train", *FLAGS, "--epochs", "4", "--data", data, "--out", out]
    procs = start_ranks(args, tmp_path, POISON)
    ended = {}
    deadline = time.monotonic() + 200
    while len(ended) < 2 and time.monotonic() < deadline:
        ended.update({r: time.monotonic() for r, p in enumerate(procs) if p.poll() is not None})
        time.sleep(0.05)
    for p in procs:
        p.kill()
    errors = [stderr_of(tmp_path, r) for r in (0, 1)]
    assert [p.wait() for p in procs] == [4, 4], errors
    assert abs(ended[0] - ended[1]) < 10, ended
    last = [e.strip().splitlines()[-1] for e in errors]
    assert last[0] == last[1], last  # the same step on both, and rank 1 named
    assert f"at step {STEPS_PER_EPOCH + 3} on rank 1 (epoch 2" in last[0], last
    assert not any("Traceback" in e for e in errors), errors
    assert json.loads((out / "exit.json").read_text())["status"] == 4
    assert [x["epoch"] for x in records(out)] == [1]


@pytest.mark.timeout(600)
def test_a_stopped_rank_fails_the_others_within_the_rank_timeout(tmp_path, data):
    timeout = 12
    out = tmp_path / "run"
    args = ["train", *FLAGS, "--epochs", "50", "--rank-timeout", timeout, "--data", data]
    procs = start_ranks([*args, "--out", out], tmp_path)
    try:
        deadline = time.monotonic() + 150
        while not records(out) and time.monotonic() < deadline:
            assert all(p.poll() is None for p in procs), [stderr_of(tmp_path, r) for r in (0, 1)]
            time.sleep(0.05)
        os.kill(procs[1].pid, signal.SIGSTOP)
        stopped = time.monotonic()
        code = procs[0].wait(timeout=timeout + 60)
        waited = time.monotonic() - stopped
    finally:
        for p in procs:
            p.kill()  # SIGKILL ends a stopped process too
            p.wait()
    err = stderr_of(tmp_path, 0).strip()
    print(f"rank 0 exited {waited:.1f} s after rank 1 was stopped (--rank-timeout {timeout})")
    assert code == 1, err
    assert "Traceback" not in err
    assert err.splitlines()[-1].startswith(
        "fastmbv1 train: error: rank 0: the other ranks stopped answering"
    ), err
    assert timeout - 1 < waited < timeout + 30


@pytest.mark.timeout(600)
@pytest.mark.parametrize("grace", [interrupts.SIGNAL_GRACE_S, 0.0], ids=["in-time", "no-time"])
def test_sigterm_in_an_epochs_last_step_saves_before_any_evaluation(
    tmp_path, data, monkeypatch, capsys, grace
):
    monkeypatch.setattr(interrupts, "SIGNAL_GRACE_S", grace)
    timeline = []
    real_loss, calls = augment.mixed_loss, []

    def signalling(*args):
        calls.append(1)
        if len(calls) == 2 * STEPS_PER_EPOCH:  # the last step of epoch 2
            timeline.append(("SIGTERM sent", time.time()))
            os.kill(os.getpid(), signal.SIGTERM)
        return real_loss(*args)

    checkpoint = tmp_path / "run" / "checkpoint-0002.pt"
    real_evaluate = train_module.evaluate_run

    def evaluate_run(*args):
        if timeline:
            if checkpoint.exists():
                timeline.append(("checkpoint-0002.pt written", checkpoint.stat().st_mtime))
            timeline.append(("evaluation starts", time.time()))
        return real_evaluate(*args)

    monkeypatch.setattr(augment, "mixed_loss", signalling)
    monkeypatch.setattr(train_module, "evaluate_run", evaluate_run)
    cfg = tiny_config(tmp_path, data, epochs=4, checkpoint_every=0, keep=10)
    with pytest.raises(Interrupted, match="SIGTERM after epoch 2"):
        train(cfg)
    for what, when in timeline:
        print(f"{datetime.fromtimestamp(when).isoformat(timespec='milliseconds')}  {what}")
    assert "saved" in capsys.readouterr().err
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["epoch"] == 2
    last = records(tmp_path / "run")[-1]
    assert last["epoch"] == 2 and saved["metrics"][-1] == last
    if grace:
        names = [what for what, _ in timeline]
        assert names == ["SIGTERM sent", "checkpoint-0002.pt written", "evaluation starts"]
        assert timeline[1][1] <= timeline[2][1]
        assert last["test_acc"] is not None
    else:  # no time: the checkpoint, and no evaluation at all
        assert [what for what, _ in timeline] == ["SIGTERM sent"]
        assert last["test_acc"] is None


@pytest.mark.timeout(600)
def test_ranks_gone_time_driven_keep_identical_weights(tmp_path, data):
    from test_distributed import rank_main

    out = tmp_path / "run"
    # 200 planned epochs cannot fit 25 s: the clock soon drives the LR by time, and each
    # rank's clock reads its own start and step times.
    fields = {"epochs": 200, "budget": 25.0, "eval_every": 5}
    args = (2, free_port(), str(data), str(out), str(tmp_path / "cache"), fields)
    mp.spawn(rank_main, args=args, nprocs=2, join=True)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_by"] == "budget" and summary["steps"] >= 2 * STEPS_PER_EPOCH, summary
    w0, w1 = (torch.load(f"{out}.rank{r}.pt") for r in (0, 1))
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k


def bucket_rank(rank: int, port: int, out: str) -> None:
    """One rank: a compiled, DDP-wrapped full-width network with 2 MB buckets, two steps;
    writes how many graphs dynamo compiled and how many buckets DDP settled on."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2"
    )
    torch.set_num_threads(1)
    from test_compile import CountingBackend

    from fastmbv1 import distributed, step
    from fastmbv1.plan import make_config

    backend = CountingBackend()
    step.COMPILE_BACKEND, step.DDP_BUCKET_CAP_MB = backend, 2
    world = distributed.init(torch.device("cpu"), 120)
    cfg = make_config({"preset": "cpu", "width": 1.0, "epochs": 1, "compile": True, "amp": "off"})
    run = step.build_run(cfg, torch.device("cpu"), world)
    x = torch.rand(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (4,))
    for _ in range(2):  # DDP settles its buckets in the order of the first backward
        step.train_step(run, x, y, y, 1.0)
    buckets = run.model_for_step.reducer._get_zeros_like_grad_buckets()
    result = {"graphs": len(backend.graphs), "buckets": len(buckets)}
    Path(f"{out}.rank{rank}.json").write_text(json.dumps(result))
    distributed.shutdown()


@pytest.mark.timeout(600)
def test_the_compiled_graph_splits_once_per_ddp_bucket(tmp_path):
    out = str(tmp_path / "split")
    mp.spawn(bucket_rank, args=(free_port(), out), nprocs=2, join=True)
    for rank in (0, 1):
        seen = json.loads(Path(f"{out}.rank{rank}.json").read_text())
        # 12.9 MB of gradients in buckets of 2 MB: several, and one graph for each.
        assert seen["buckets"] >= 4 and seen["graphs"] == seen["buckets"], seen


# --- tuning workers on a real PostgreSQL -------------------------------------------------


def postgres_bin() -> Path | None:
    """Debian keeps the server out of PATH: /usr/lib/postgresql/<version>/bin."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    on_path = shutil.which("initdb")
    return found[-1].parent if found else Path(on_path).parent if on_path else None


@pytest.fixture
def postgres():
    """A throwaway PostgreSQL cluster on a loopback port, run by an unprivileged user (the
    server refuses root), removed at the end, pass or fail."""
    pytest.importorskip("psycopg", reason="the PostgreSQL driver (pip install 'psycopg[binary]')")
    bin_dir = postgres_bin()
    if bin_dir is None:
        pytest.skip("no PostgreSQL server installed (initdb in /usr/lib/postgresql/*/bin or PATH)")
    folder = Path(tempfile.mkdtemp(prefix="fastmbv1-pg-"))  # pytest's tmp_path is root's own
    as_user = {}
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        os.chown(folder, nobody.pw_uid, nobody.pw_gid)
        as_user = dict(user=nobody.pw_uid, group=nobody.pw_gid, extra_groups=[])
    port = free_port()
    pg_data, ctl = folder / "data", str(bin_dir / "pg_ctl")

    def pg(*cmd: str) -> None:
        subprocess.run(cmd, check=True, capture_output=True, timeout=60, cwd=folder, **as_user)

    try:
        pg(str(bin_dir / "initdb"), "-D", str(pg_data), "-U", "postgres", "--auth=trust",
           "--no-sync", "-E", "UTF8", "--locale=C")  # fmt: skip
        options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off"
        pg(ctl, "-D", str(pg_data), "-o", options, "-l", str(folder / "log"), "-w", "start")
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        if (pg_data / "postmaster.pid").exists():
            pg(ctl, "-D", str(pg_data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(folder, ignore_errors=True)


GRACE_S = 3


def tune_worker(name: str, storage: str, tmp_path: Path, data: Path) -> subprocess.Popen:
    from test_tune import SPACE  # tiny recipes, a few seconds a trial

    space = tmp_path / "space.toml"
    space.write_text(SPACE)
    args = [
        "tune", "--target-acc", "99", "--trial-budget", "4", "--trials", "4",
        "--space", space, "--data", data, "--storage", storage, "--study", "shared",
        "--heartbeat-grace", GRACE_S, "--out", tmp_path / name,
    ]  # fmt: skip
    return start_logged([sys.executable, "-m", "fastmbv1", *args], tmp_path / f"{name}.log")


@pytest.mark.timeout(600)
def test_tuning_workers_share_a_postgresql_study_and_outlive_a_killed_one(tmp_path, data, postgres):
    optuna = pytest.importorskip("optuna")
    from optuna.trial import TrialState

    a, b = (tune_worker(n, postgres, tmp_path, data) for n in ("a", "b"))  # start together
    try:
        deadline = time.monotonic() + 200
        while not list((tmp_path / "a").glob("trial-*/metrics.jsonl")):  # a is mid-trial
            assert a.poll() is None and time.monotonic() < deadline, (
                tmp_path / "a.log"
            ).read_text()
            time.sleep(0.05)
        a.kill()
        killed = datetime.now()
        assert b.wait(timeout=240) == 0, (tmp_path / "b.log").read_text()[-3000:]
    finally:
        for w in (a, b):
            w.kill()
            w.wait()
    study = optuna.load_study(study_name="shared", storage=postgres)
    finished = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    assert len(finished) == 4
    # No trial number ran in two workers.
    workers = {t.number: t.user_attrs["worker"]["pid"] for t in study.trials}
    assert set(workers.values()) == {a.pid, b.pid}
    folders = [{p.name for p in (tmp_path / n).glob("trial-*")} for n in ("a", "b")]
    assert not folders[0] & folders[1] and len(folders[0] | folders[1]) == len(study.trials)
    # Workers that started together drew different parameters for their first trials.
    first = {pid: min(n for n, p in workers.items() if p == pid) for pid in (a.pid, b.pid)}
    assert study.trials[first[a.pid]].params != study.trials[first[b.pid]].params
    # The killed worker's trial failed once its heartbeat was the grace old (it beat every
    # second), while the other worker went on.
    (dead,) = [t for t in study.trials if workers[t.number] == a.pid]
    assert dead.state == TrialState.FAIL
    assert (dead.datetime_complete - killed).total_seconds() >= GRACE_S - 1 - 0.5


@pytest.mark.timeout(60)
def test_workers_that_start_together_draw_different_parameters(tmp_path):
    optuna = pytest.importorskip("optuna")
    from test_tune import SPACE

    from fastmbv1.tune.space import read_space
    from fastmbv1.tune.study import PerTrialSeed

    storage = optuna.storages.InMemoryStorage()
    optuna.create_study(storage=storage, study_name="s")
    space_file = tmp_path / "space.toml"
    space_file.write_text(SPACE)
    space = read_space(space_file)
    drawn = []
    for _ in range(2):  # each worker sets its sampler before either has a trial
        worker = optuna.load_study(study_name="s", storage=storage)
        worker.sampler = PerTrialSeed(seed=0, n_startup_trials=2)
        drawn.append((worker, worker.ask()))
    values = [space.draw(trial) for _, trial in drawn]
    assert values[0] != values[1]
    # The same seed and trial number draw the same values: one worker's study repeats.
    again = optuna.create_study(storage=optuna.storages.InMemoryStorage())
    again.sampler = PerTrialSeed(seed=0, n_startup_trials=2)
    assert space.draw(again.ask()) == values[0]
