"""Multi-process runs on jax.distributed: one process per host (or per GPU), one global mesh.

train.py and evaluate.py take the flags JAX names (`--coordinator_address=HOST:PORT
--num_processes=N --process_id=I`), or `--distributed` for the cluster detection JAX does
itself (SLURM, TPU pods, Open MPI). Without them a run is one process, as before.

What a multi-process run does differently, all of it here or asked for from here:
- the mesh spans `jax.devices()` (every process's devices); each process builds only the rows of
  every global batch its own devices hold (`place`), from the same pure (seed, epoch, index)
  order, so the global batch is the one-process run's;
- checkpoints are written by all processes together through Orbax; the files of the run
  (history.jsonl, summary.json, config.json, TensorBoard, the plot, the workdir lock) by process 0
  only, and every process but 0 prints nothing to stdout;
- a stop signal is agreed on (`any_process`) every `train.log_every` steps, so every process
  stops, and saves, after the same step;
- an error raised on one process is published in the coordination service's key-value store and
  that process exits; a watcher thread in every other process reads it within a second and stops
  that process with the message (`report_error`, `watch_errors`). A process that dies without a
  word (kill -9) is detected by JAX's heartbeat (`heartbeat_timeout_seconds`), which stops the
  others.
On CPU the collectives between processes are gloo's (`jax_cpu_collectives_implementation`), and
the persistent compilation cache is off (`no_cache_on_cpu`).
"""

import atexit
import contextlib
import errno
import fcntl
import ipaddress
import os
import re
import socket
import stat
import sys
import tempfile
import threading
import time

from infinito_jax.errors import ConfigError, InfinitoError

ERROR_DIR = "infinito/error/"  # the key-value store's folder for the errors of the processes
ACK_DIR = "infinito/ack/"  # processes that read another's error and are stopping
EXIT_DIR = "infinito/exiting/"  # processes about to exit (process 0, the store's host, goes last)
CODE_DIR = "infinito/exit_code/"  # the exit code of a process that published an error: the
# others exit with it (all 130 when one was aborted by a second signal, not 130 and 1)

_state = {"on": False, "watcher": None, "claim": None}


class DistributedError(InfinitoError):
  """jax.distributed cannot start: the coordinator is unreachable or the flags disagree."""


def active() -> bool:
  """True in a run of several processes (jax.distributed initialized by `initialize`)."""
  return _state["on"]


def process_index() -> int:
  if not active():
    return 0
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_index()


def is_primary() -> bool:
  """Process 0: the one that writes the run's files and prints."""
  return process_index() == 0


def check_flags(coordinator_address, num_processes, process_id, auto: bool) -> bool:
  """Validates the flags; returns whether the run is multi-process."""
  explicit = [coordinator_address, num_processes, process_id]
  if auto and any(x is not None for x in explicit):
    # JAX's detection can be helped by explicit values: pass them through
    return True
  if all(x is None for x in explicit):
    return auto
  if any(x is None for x in explicit):
    missing = [n for n, x in zip(("--coordinator_address", "--num_processes", "--process_id"),
                                 explicit) if x is None]
    raise ConfigError(f"a multi-process run needs --coordinator_address=HOST:PORT, "
                      f"--num_processes=N and --process_id=I together; missing "
                      f"{', '.join(missing)} (or pass --distributed on a SLURM, TPU or "
                      "Open MPI cluster, where JAX finds them).")
  if num_processes < 1:
    raise ConfigError(f"--num_processes={num_processes} must be at least 1 (the number of "
                      "processes of the run, process 0 included).")
  if not 0 <= process_id < num_processes:
    raise ConfigError(f"--process_id={process_id} must be in 0..{num_processes - 1} for "
                      f"--num_processes={num_processes}.")
  _split_address(coordinator_address)
  return True


def _split_address(address: str) -> tuple[str, int]:
  host, _, port = address.rpartition(":")
  if not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise ConfigError(f"--coordinator_address={address!r} is not HOST:PORT (e.g. "
                      "node001:12345, or localhost:12345 for processes on one machine).")
  return host.strip("[]"), int(port)


def _host_key(host: str) -> str:
  """'local' for an address of this host, else the first address `host` resolves to (the name
  itself where it does not resolve). An address is this host's where it is a loopback or the
  unspecified address (0.0.0.0, ::; IPv4-mapped IPv6 counts as its IPv4), one this host's name
  resolves to, or one a socket can be bound to here (any of its interfaces' addresses): each
  reaches a coordinator listening on this host."""
  try:
    resolved = {a[4][0] for a in socket.getaddrinfo(host, None)}
  except (OSError, UnicodeError):
    return host
  try:
    own = {a[4][0] for a in socket.getaddrinfo(socket.gethostname(), None)}
  except (OSError, UnicodeError):
    own = set()
  if resolved & own or any(_is_local_address(a) for a in resolved):
    return "local"
  return sorted(resolved)[0]


def _is_local_address(address: str) -> bool:
  try:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
  except ValueError:
    return False
  if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
    ip = ip.ipv4_mapped
  if ip.is_loopback or ip.is_unspecified:
    return True
  family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
  try:
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
      sock.bind((address, 0))  # only an address of one of this host's interfaces binds
    return True
  except OSError:
    return False


def claim_process_id(address: str, process_id: int, num_processes: int | None) -> None:
  """Refuses a second process started on this host with the `process_id` of a running process
  of the same run (the same --coordinator_address): JAX's coordination service takes such a
  process for the first one restarted and aborts every process of the run with a C++ stack
  trace, the running ones included. The claim is an flock on a file named after the address and
  the id, held until the process exits (the kernel releases it after a crash or kill -9 too),
  in a folder of this user's under /tmp (whatever $TMPDIR says, so that every process of this
  host finds it; the temporary directory where /tmp cannot be used). The address's host counts
  by what it is (_host_key): every spelling of this host is one coordinator.
  Processes on other hosts cannot be seen from here. A folder that cannot be made, or is not
  this user's, or a disk without locks, skips the check with a warning line. The file is removed
  at exit, while still locked (a kill -9 leaves it, and the next claim reuses it); a claim that
  locks a file so removed or replaced in the meantime starts again on the file now at the
  path. What is no regular file at the path (a symbolic link, a FIFO, a socket) holds no claim
  and is removed; a directory, or a file that cannot be opened, is refused with the fix."""
  base = "/tmp" if os.access("/tmp", os.W_OK | os.X_OK) else tempfile.gettempdir()
  folder = os.path.join(base, f"infinito_jax-{os.getuid()}")
  host, port = _split_address(address)
  name = re.sub(r"[^A-Za-z0-9._-]", "_", f"{_host_key(host)}_{port}") + \
      f".process{process_id}.lock"
  path = os.path.join(folder, name)
  what = f"--process_id={process_id} of the run at {address}"

  def unchecked(reason: str) -> None:
    print(f"warning: cannot check that {what} is not taken on this host: {reason}. Make sure "
          "each process has its own --process_id: a duplicate aborts the whole run.",
          file=sys.stderr, flush=True)

  def refuse(problem: str, fix: str):
    return DistributedError(f"cannot claim {what}: {problem}. {fix} and start the process "
                            "again.")

  try:
    os.makedirs(folder, mode=0o700, exist_ok=True)
    if os.stat(folder).st_uid != os.getuid():
      return unchecked(f"{folder} belongs to another user")  # no check rather than theirs
  except OSError as e:
    return unchecked(f"{folder} cannot be made ({e.strerror})")
  for _ in range(100):  # a new round only when the path held what is not a claim
    try:
      fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o600)
    except OSError as e:
      fd = None
      if e.errno in (errno.ELOOP, errno.ENXIO):  # a symbolic link, a socket
        pass
      elif e.errno == errno.EISDIR:
        raise refuse(f"{path}, where its lock file goes, is a directory",
                     f"Remove it (rm -r {path})") from None
      elif e.errno in (errno.EACCES, errno.EPERM):  # which may be a running process's claim
        raise refuse(f"its lock file {path} cannot be opened ({e.strerror})",
                     "If no process of this run is running on this host, remove it "
                     f"(rm -f {path})") from None
      else:
        return unchecked(f"{path} cannot be made ({e.strerror})")  # e.g. a full /tmp
    if fd is None or not stat.S_ISREG(os.fstat(fd).st_mode):  # or a FIFO, a device
      if fd is not None:
        os.close(fd)
      with contextlib.suppress(OSError):  # claims are regular files: this is none, in this
        os.unlink(path)  # user's own folder
      continue
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        os.close(fd)
        return unchecked(f"{path} cannot be locked ({e.strerror})")  # no locks on that disk
      holder = ""
      for _ in range(20):  # a holder that has just locked the file writes its pid next
        with contextlib.suppress(OSError):
          holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        if holder:
          break
        time.sleep(0.01)
      os.close(fd)
      ids = f"0..{num_processes - 1}" if num_processes else "0..N-1"
      raise DistributedError(
          f"--process_id={process_id} is taken: process {process_id} of the run at {address} is "
          f"already running on this host{f' (pid {holder})' if holder.isdigit() else ''}. Give "
          f"each process its own --process_id ({ids}, each once); the running run is left as "
          "it is.") from None
    if _same_file(fd, path):
      break
    os.close(fd)  # locked the file its holder removed at exit: claim the one at the path now
  else:
    return unchecked(f"{path} kept changing")
  try:
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
  except OSError:
    pass  # a full /tmp: the pid is a courtesy (as in lifecycle.WorkdirLock); the flock is the claim
  _state["claim"] = (fd, path)  # held, open, for the life of the process
  atexit.register(release_claim)


def release_claim() -> None:
  """Ends this process's claim_process_id: the lock file is removed while still locked (a
  claimer that opened it before sees it gone), then closed. At exit (atexit), and before every
  os._exit of a run (which skips atexit); once."""
  claim, _state["claim"] = _state.get("claim"), None
  if claim is None:
    return
  fd, path = claim
  with contextlib.suppress(OSError):
    if _same_file(fd, path):
      os.unlink(path)
  with contextlib.suppress(OSError):
    os.close(fd)


def _same_file(fd: int, path: str) -> bool:
  """Whether `path` still names the file open as `fd`."""
  try:
    a, b = os.fstat(fd), os.stat(path, follow_symlinks=False)
  except OSError:
    return False
  return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def check_port_free(address: str) -> None:
  """Process 0's coordinator must be able to listen on the address's port. JAX's gRPC server
  fails to add a port in use with a log line, and the process then often dies of a segfault
  inside jax.distributed.initialize; a trial bind (with SO_REUSEADDR, as gRPC's, so that a
  port left in TIME_WAIT by an earlier run still counts as free) says it first."""
  _, port = _split_address(address)
  for family, where in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
    try:
      sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError:
      continue  # no IPv6 here: try IPv4
    try:
      sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
      sock.bind((where, port))
      sock.listen(1)
      return
    except OSError as e:
      if e.errno == errno.EADDRINUSE:
        raise DistributedError(f"the coordinator cannot listen on {address}: port {port} is in "
                               "use by another program; choose another free port for "
                               "--coordinator_address on every process.") from None
    finally:
      sock.close()


def wait_for_coordinator(address: str, timeout_s: float, interrupted=lambda: None) -> None:
  """Waits until the coordinator (process 0) accepts TCP connections; a clear error after
  `timeout_s` instead of jax.distributed's abort with a stack trace. A stop signal
  (`interrupted()` returns its name) exits at once."""
  host, port = _split_address(address)
  deadline = time.monotonic() + timeout_s
  last = None
  while True:
    if (name := interrupted()):
      print(f"{name} received while waiting for the coordinator: exiting; nothing was changed.",
            file=sys.stderr, flush=True)
      release_claim()
      os._exit(0)
    try:
      with socket.create_connection((host, port), timeout=min(2.0, max(0.1, timeout_s))):
        return
    except OSError as e:
      last = e
    if time.monotonic() >= deadline:
      reason = getattr(last, "strerror", None) or str(last)
      raise DistributedError(
          f"cannot reach the coordinator at {address} within {timeout_s:g} s ({reason}). "
          "Start process 0 (--process_id=0) with the same --coordinator_address, check the "
          "host name and that the port is open between the machines, or raise "
          "--distributed_timeout.")
    time.sleep(0.2)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, auto: bool = False,
               timeout_s: int = 300, interrupted=lambda: None) -> bool:
  """Starts jax.distributed when the flags ask for several processes; returns whether it did.

  Must run before anything touches a device. `auto` (--distributed) lets JAX detect the cluster
  (SLURM, TPU pod slices, Open MPI); explicit values win over what it detects.

  JAX's start-up blocks in C++ (no signal gets through) and aborts the process when a process
  is missing at its deadline; so it runs in a thread while this one waits: a stop signal
  (`interrupted()` returns its name) exits at once, and the missing-process case is one clear
  error at `timeout_s`, before JAX's own deadline (`timeout_s` + 30 s).
  """
  if not check_flags(coordinator_address, num_processes, process_id, auto):
    return False
  import jax  # pylint: disable=g-import-not-at-top
  # CPU processes talk through gloo (harmless where the devices are GPUs or TPUs)
  try:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  except (AttributeError, KeyError, ValueError):
    pass  # a JAX whose CPU collectives need no choosing
  # JAX's preemption service installs a C++ SIGTERM handler at the end of initialize, which
  # took a SIGTERM from the scheduler away from the run's own (lifecycle.StopSignals; the
  # processes agree on a stop themselves) until train.py installed that again: one that came
  # in between was lost. Nothing here uses its sync points (multihost_utils).
  try:
    jax.config.update("jax_enable_preemption_service", False)
  except (AttributeError, KeyError, ValueError):
    pass  # a JAX without it: train.py reinstalls the handlers after the start
  if process_id is not None and coordinator_address:
    claim_process_id(coordinator_address, process_id, num_processes)
  if process_id not in (None, 0) and coordinator_address:
    wait_for_coordinator(coordinator_address, timeout_s, interrupted)
  elif coordinator_address and num_processes and num_processes > 1:
    check_port_free(coordinator_address)
    print(f"Process 0: waiting up to {timeout_s} s for {num_processes - 1} more process(es) "
          f"at {coordinator_address}", file=sys.stderr, flush=True)
  kwargs = {k: v for k, v in (("coordinator_address", coordinator_address),
                              ("num_processes", num_processes),
                              ("process_id", process_id)) if v is not None}
  outcome = {}

  def start():
    try:
      jax.distributed.initialize(initialization_timeout=int(timeout_s) + 30, **kwargs)
      outcome["ok"] = True
    except Exception as e:  # pylint: disable=broad-except
      outcome["error"] = e

  thread = threading.Thread(target=start, name="infinito-distributed-start", daemon=True)
  thread.start()
  deadline = time.monotonic() + timeout_s
  while thread.is_alive():
    thread.join(0.2)
    if (name := interrupted()):
      print(f"{name} received while the processes were joining: exiting; nothing was changed.",
            file=sys.stderr, flush=True)
      release_claim()
      os._exit(0)
    if thread.is_alive() and time.monotonic() > deadline:
      print(f"error: the {num_processes or 'expected'} processes did not all join "
            f"{coordinator_address or 'the coordinator'} within {timeout_s} s (this is process "
            f"{process_id if process_id is not None else '?'}). Start every process with the "
            "same --coordinator_address and --num_processes and its own --process_id (0..N-1, "
            "each once), or raise --distributed_timeout.", file=sys.stderr, flush=True)
      release_claim()
      os._exit(1)
  if "error" in outcome:
    e = outcome["error"]
    text = str(e).splitlines()[0] if str(e).strip() else type(e).__name__
    if "Failed to start RPC server" in str(e) or "add port" in str(e):
      raise DistributedError(f"the coordinator cannot listen on {coordinator_address}: the "
                             "port is probably in use; choose another free port for "
                             "--coordinator_address on every process.") from None
    raise DistributedError(f"jax.distributed could not start ({text}). Check the flags "
                           "(--coordinator_address, --num_processes, --process_id), or pass "
                           "them explicitly where JAX does not detect the cluster.") from None
  _state["on"] = True
  no_cache_on_cpu()
  watch_errors()
  _check_processes(num_processes, timeout_s)
  return True


def no_cache_on_cpu() -> None:
  """Turns JAX's persistent compilation cache off in a multi-process run on CPU, before the first
  compilation. Only process 0 writes the cache, so in a second run of
  the same shapes process 0 loads its programs from it and the others compile theirs; under JAX
  0.12.1 such processes hang in their first collective between processes (under 0.10.2 they do
  not). CPU programs compile in seconds anyway; GPU and TPU runs keep the cache."""
  import jax  # pylint: disable=g-import-not-at-top
  if _state["on"] and jax.default_backend() == "cpu":
    jax.config.update("jax_enable_compilation_cache", False)


def _check_processes(num_processes: int | None, timeout_s: float) -> None:
  """Every process must have been started with the same --num_processes and hold as many
  local devices (the global mesh is a grid of processes x local devices): compared through
  the key-value store, before any collective, which would fail with a reshape error or hang."""
  import json  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  me, client = process_index(), _client()
  mine = {"num_processes": num_processes, "local_devices": jax.local_device_count()}
  client.key_value_set(f"infinito/processes/{me}", json.dumps(mine))
  seen = {p: mine if p == me else json.loads(client.blocking_key_value_get(
      f"infinito/processes/{p}", int(timeout_s * 1000))) for p in range(jax.process_count())}
  for key, fix in (("num_processes", "start every process with the same --num_processes"),
                   ("local_devices", "give every process as many devices (the same "
                                     "CUDA_VISIBLE_DEVICES count, or the same XLA_FLAGS "
                                     "--xla_force_host_platform_device_count)")):
    values = {p: v[key] for p, v in seen.items()}
    if len(set(values.values())) > 1:
      what = "--num_processes" if key == "num_processes" else "local devices"
      exit_with_error(f"[process {me}] the processes differ in {what}: "
                      + ", ".join(f"process {p}: {v}" for p, v in sorted(values.items()))
                      + f"; {fix}.")


def _client():
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
  return jax_distributed.global_state.client


def report_error(message: str, code: int = 1) -> None:
  """Publishes this process's error, and the exit code the others take from it, for the
  others (a no-op in a one-process run)."""
  if not active():
    return
  try:
    _client().key_value_set(f"{CODE_DIR}{process_index()}", str(code))  # before its message
    _client().key_value_set(f"{ERROR_DIR}{process_index()}", message)
  except Exception:  # pylint: disable=broad-except
    pass  # the heartbeat stops the others anyway, without the message


def published_errors() -> dict[int, str]:
  """{process: message} of the errors published so far."""
  try:
    entries = _client().key_value_dir_get(ERROR_DIR)
  except Exception:  # pylint: disable=broad-except
    return {}
  return {int(k.rsplit("/", 1)[-1]): v for k, v in entries}


def published_code(process: int) -> int:
  """The exit code process `process` published with its error (1 where none is readable)."""
  try:
    codes = {int(k.rsplit("/", 1)[-1]): v for k, v in _client().key_value_dir_get(CODE_DIR)}
    return int(codes.get(process, 1))
  except Exception:  # pylint: disable=broad-except
    return 1


def _count(folder: str) -> set[int]:
  try:
    return {int(k.rsplit("/", 1)[-1]) for k, _ in _client().key_value_dir_get(folder)}
  except Exception:  # pylint: disable=broad-except
    return set()


def exit_with_error(message: str, code: int = 1, wait_s: float = 10.0) -> None:
  """Multi-process: publish, print, and exit now, without waiting at the shutdown barrier for
  processes that may be blocked in a collective with this one (what was saved is on disk).

  Waits (at most `wait_s`) until every other process has read the error: process 0 hosts the
  key-value store, and its exit would end the others without the message."""
  _state["leaving"] = True  # the watcher says no more: this process's own error is the line
  report_error(message, code)
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.stdout.flush()
  import jax  # pylint: disable=g-import-not-at-top
  others = set(range(jax.process_count())) - {process_index()}
  deadline = time.monotonic() + wait_s
  while time.monotonic() < deadline and not others <= (_count(ACK_DIR) | _count(ERROR_DIR)):
    time.sleep(0.1)
  _leave(code)


def _leave(code: int) -> None:
  """os._exit, process 0 last: it hosts the coordination service, and its end aborts any
  process still connected to it (SIGABRT, exit code 134, a crash dump after the one line).
  Every other process says it is leaving, then leaves; process 0 waits (at most 5 s: one may
  be dead already) until all have said so."""
  import jax  # pylint: disable=g-import-not-at-top
  me = process_index()
  sys.stdout.flush()
  sys.stderr.flush()
  if me == 0:
    others = set(range(1, jax.process_count()))
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline and not others <= _count(EXIT_DIR):
      time.sleep(0.05)
    time.sleep(0.3)  # their os._exit, just after the key
  else:
    try:
      _client().key_value_set(f"{EXIT_DIR}{me}", "leaving")
    except Exception:  # pylint: disable=broad-except
      pass
  release_claim()
  os._exit(code)


def watch_errors(interval_s: float = 0.5) -> None:
  """A daemon thread that stops this process when another one published an error."""
  if _state["watcher"] is not None:
    return
  me = process_index()

  def loop():
    while not _state.get("closing"):
      time.sleep(interval_s)
      if _state.get("closing"):
        return
      errors = {p: m for p, m in published_errors().items() if p != me}
      if errors and not _state.get("leaving"):
        p, msg = min(errors.items())
        print(f"error: process {p} stopped: {msg}\n(process {me} stops too)", file=sys.stderr,
              flush=True)
        try:
          _client().key_value_set(f"{ACK_DIR}{me}", "stopping")
        except Exception:  # pylint: disable=broad-except
          pass
        _run_abort_hook()
        _leave(published_code(p))  # its code (130: aborted), the key-value store's host last

  t = threading.Thread(target=loop, name="infinito-error-watcher", daemon=True)
  t.start()
  _state["watcher"] = t

  def close():  # before jax.distributed.shutdown (atexit runs last-registered first): the
    _state["closing"] = True  # watcher must not be inside a key-value call when the client goes
    t.join(timeout=5 * interval_s)

  atexit.register(close)


def set_abort_hook(fn) -> None:
  """`fn()` runs when an error (another process's, or a failed collective) ends this process
  inside the step loop: process 0's summary.json then says aborted, not running (None: off)."""
  _state["abort_hook"] = fn


def _run_abort_hook() -> None:
  if (hook := _state.get("abort_hook")) is not None:
    try:
      hook()
    except Exception:  # pylint: disable=broad-except
      pass  # the exit goes ahead; the checkpoints say where the run was


def any_process(flag: bool) -> bool:
  """True on every process if `flag` is True on any (a collective: every process must call it)."""
  if not active():
    return bool(flag)
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.any(multihost_utils.process_allgather(np.array([bool(flag)]))))


def barrier(name: str) -> None:
  """Every process waits here for the others (a no-op in a one-process run)."""
  if active():
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def local_block(sharding, shape) -> tuple[slice, ...]:
  """The rows (a box of index ranges) of a global array of `shape` that this process's devices
  hold under `sharding`: what it must build. All of it in a one-process run."""
  boxes = list(sharding.addressable_devices_indices_map(tuple(shape)).values())
  out = []
  for d, n in enumerate(shape):
    starts = [(b[d].start or 0) if d < len(b) else 0 for b in boxes]
    stops = [(n if b[d].stop is None else b[d].stop) if d < len(b) else n for b in boxes]
    out.append(slice(min(starts), max(stops)))
  return tuple(out)


def place(build, shapes: dict, sharding):
  """Global arrays {name: [shape]} placed by `sharding`, each process building only its rows:
  `build(box)` returns {name: np.ndarray} of the rows in `box` (a tuple of slices).

  The same call in a one-process run builds everything (the box is the whole array).
  """
  import jax  # pylint: disable=g-import-not-at-top
  first = next(iter(shapes.values()))
  box = local_block(sharding, first)
  local = build(box)
  return {k: jax.make_array_from_process_local_data(sharding, local[k], tuple(shapes[k]))
          for k in shapes}


def describe(e: BaseException) -> str:
  """The one-line message the command-line scripts print for `e`."""
  flag = getattr(e, "flag", None)  # DamagedCheckpointError: the flag that resumes
  if isinstance(e, InfinitoError):
    return f"{e}" + (f" (add {flag})" if flag else "")
  return f"{type(e).__name__}: {e}"


def _collective_failed(e: BaseException) -> bool:
  text = str(e)
  return any(w in text for w in ("Gloo", "gloo", "Connection reset by peer", "NCCL",
                                 "heartbeat", "coordination service", "Connection closed"))


class errors_stop_all:  # pylint: disable=invalid-name
  """In a multi-process run, an exception raised inside stops every process with its message
  at once (see `exit_with_error`), before any clean-up that would wait for the others; in a
  one-process run it propagates as usual. `before_exit` runs first (local clean-up only).
  StopRequested propagates as usual: every process raises it together, after agreeing."""

  def __init__(self, before_exit=None):
    self.before_exit = before_exit

  def __enter__(self):
    return self

  def __exit__(self, kind, e, tb):
    from infinito_jax.lifecycle import StopRequested  # pylint: disable=g-import-not-at-top
    if isinstance(e, StopRequested):  # a stop every process agreed on (train._loop): no error
      return False
    if active() and e is not None and isinstance(e, Exception):
      me = process_index()
      if self.before_exit is not None:
        try:
          self.before_exit()
        except Exception:  # pylint: disable=broad-except
          pass
      _run_abort_hook()
      if _collective_failed(e):  # a peer died: say so, with its own message if it left one
        time.sleep(1.0)  # its published error, if any, arrives first
        theirs = {p: m for p, m in published_errors().items() if p != me}
        if theirs:
          p, msg = min(theirs.items())
          exit_with_error(f"process {p} stopped: {msg} (process {me} stops too)",
                          published_code(p))
        exit_with_error(
            f"[process {me}] a collective with the other processes failed ("
            f"{str(e).strip().splitlines()[0][:200]}): another process probably died; see "
            "its log. Every checkpoint saved before is intact: start all processes again to "
            "resume from the last one (a run that saved none starts anew).")
      if not isinstance(e, InfinitoError):  # a bug: keep its traceback
        import traceback  # pylint: disable=g-import-not-at-top
        traceback.print_exception(kind, e, tb)
      exit_with_error(f"[process {me}] {describe(e)}")
    return False


def define_flags() -> None:
  """The absl flags of a multi-process run, named as jax.distributed.initialize names them."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("coordinator_address", None,
                      "Multi-process: HOST:PORT of process 0, which runs the coordinator "
                      "(the same on every process).")
  flags.DEFINE_integer("num_processes", None, "Multi-process: how many processes in all.")
  flags.DEFINE_integer("process_id", None, "Multi-process: this process's index, 0..N-1.")
  flags.DEFINE_bool("distributed", False,
                    "Multi-process on a cluster JAX detects (SLURM, TPU pod slice, Open MPI): "
                    "jax.distributed.initialize() finds the coordinator and the process ids.")
  flags.DEFINE_integer("distributed_timeout", 300,
                       "Seconds to wait for the coordinator and the other processes.")


def initialize_from_flags(interrupted=lambda: None) -> bool:
  """Starts jax.distributed from the flags of `define_flags`; every process but 0 then prints
  nothing to stdout (the run's output is process 0's; errors still go to stderr)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  many = initialize(f.coordinator_address, f.num_processes, f.process_id,
                    auto=f.distributed, timeout_s=f.distributed_timeout,
                    interrupted=interrupted)
  if many and not is_primary():  # Python's prints and the libraries' (gloo's) alike
    sys.stdout.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)
  return many


_checks = {"n": 0}


def check_same(what: str, value: dict, timeout_s: float = 300) -> None:
  """Refuses a run whose processes were started with different `value`s (the config, the
  workdir): they would compile different programs and hang in their first collective.

  Process 0 publishes its value; every other process compares its own with it.
  """
  if not active():
    return
  import json  # pylint: disable=g-import-not-at-top
  _checks["n"] += 1
  key = f"infinito/same/{what}/{_checks['n']}"
  client = _client()
  if process_index() == 0:
    client.key_value_set(key, json.dumps(value, sort_keys=True), allow_overwrite=True)
    return
  theirs = json.loads(client.blocking_key_value_get(key, int(timeout_s * 1000)))
  mine = json.loads(json.dumps(value, sort_keys=True))
  if theirs != mine:
    diff = sorted(k for k in set(theirs) | set(mine) if theirs.get(k) != mine.get(k))
    raise ConfigError(
        f"process {process_index()} was started with another {what} than process 0: "
        + "; ".join(f"{k}: {mine.get(k)!r} here, {theirs.get(k)!r} on process 0"
                    for k in diff[:5])
        + ". Start every process with the same flags (only --process_id differs).")
