"""File-system helpers for everything gilora writes: content manifests, folders with the user's permissions, and an
exclusive lock on an output path.

The rule they serve: nothing a user owns is deleted or silently trusted. A folder gilora writes carries a
manifest (every file's size and SHA-256, `manifest`) so that a later run can prove the folder is ours and intact
(`verify`, `foreign_files`) before it reads or replaces it; a long run holds an advisory lock on its output
(`OutputLock`), which the OS releases when the process dies, so a crash never leaves a stale lock behind.
"""
from __future__ import annotations

import datetime
import fcntl
import hashlib
import json
import os
import socket
import sys
import tempfile
from typing import Iterable

_CHUNK = 1 << 23  # 8 MiB reads: hashing runs at the disk's or SHA-NI's speed, not Python's


class CorruptCheckpointError(ValueError):
  """A checkpoint's file is missing or its content differs from what was written (one line naming file and fix)."""


class OutputBusyError(OSError):
  """Another process holds the lock on an output path."""


def sha256_file(path: str) -> str:
  """Hex SHA-256 of a file's bytes."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(_CHUNK):
      h.update(chunk)
  return h.hexdigest()


def walk_files(folder: str) -> list[str]:
  """Every regular file under `folder`, as sorted '/'-separated paths relative to it."""
  out = []
  for root, _, names in os.walk(folder):
    for name in names:
      out.append(os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/"))
  return sorted(out)


def manifest(folder: str, exclude: Iterable[str] = ()) -> dict[str, dict]:
  """{relative path: {"bytes": size, "sha256": digest}} for every file under `folder` but `exclude`."""
  skip = set(exclude)
  return {rel: {"bytes": os.path.getsize(os.path.join(folder, rel)), "sha256": sha256_file(os.path.join(folder, rel))}
          for rel in walk_files(folder) if rel not in skip}


def verify(folder: str, files: dict[str, dict], fix: str) -> None:
  """Raises `CorruptCheckpointError` naming the first file of `files` (a `manifest`) that is missing, has another
  size or another hash under `folder`. `fix` ends the message (what the user should do)."""
  for rel, want in sorted(files.items()):
    path = os.path.join(folder, rel)
    if not os.path.isfile(path):
      raise CorruptCheckpointError(f"{path} is missing (the checkpoint lists it); {fix}")
    size = os.path.getsize(path)
    if size != want["bytes"]:
      raise CorruptCheckpointError(f"{path} has {size} bytes where {want['bytes']} were written (truncated or "
                                   f"modified); {fix}")
    if sha256_file(path) != want["sha256"]:
      raise CorruptCheckpointError(f"{path} does not match the SHA-256 recorded when it was written (corrupted or "
                                   f"modified); {fix}")


def foreign_files(folder: str, files: dict[str, dict], own: Iterable[str] = ()) -> list[str]:
  """Files under `folder` that are neither in the manifest `files` nor in `own`: what gilora did not write."""
  known = set(files) | set(own)
  return [rel for rel in walk_files(folder) if rel not in known]


def user_umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def make_temp_dir(parent: str, prefix: str) -> str:
  """`tempfile.mkdtemp` in `parent`, then given the permissions a plain `mkdir` would have (mkdtemp's are 0700,
  so a finished output would otherwise be private whatever the user's umask says)."""
  tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
  os.chmod(tmp, 0o777 & ~user_umask())
  return tmp


def fsync_dir(path: str) -> None:
  """Makes a rename inside `path` durable (POSIX); a no-op where directories cannot be opened."""
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def write_bytes(path: str, data: bytes) -> None:
  """Writes and fsyncs a file (inside a temporary folder that is renamed into place later)."""
  with open(path, "wb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())


def lock_path(out: str) -> str:
  """The lock file of an output path: a hidden sibling, so the output itself can be renamed into place. Real
  paths: `--out a` and `--out link_to_a` take the same lock."""
  parent, name = os.path.split(os.path.realpath(out))
  return os.path.join(parent, f".{name}.lock")


class OutputLock:
  """Exclusive advisory lock (`flock`) on an output path, held for a run's life.

  `with OutputLock(out):` fails at once with `OutputBusyError` naming the PID (and host, start time, command) of
  the process that holds it. The kernel drops the lock when the holder exits or is killed, so a crash leaves at
  most an unlocked `.<name>.lock` file, which the next run simply takes over; a clean exit removes it.
  """

  def __init__(self, out: str, what: str = "--out"):
    self.path = lock_path(out)
    self.out = os.path.abspath(out)
    self.what = what
    self._fd: int | None = None

  def acquire(self) -> OutputLock:
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    while True:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        holder = _read_holder(fd)
        os.close(fd)
        raise OutputBusyError(f"{self.out} is being written by another gilora run ({holder}); wait for it to finish "
                              f"or pass another {self.what}.") from None
      except OSError:
        os.close(fd)
        raise
      try:  # the previous holder may have unlinked the file between our open and our flock: lock the live one
        same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
      except FileNotFoundError:
        same = False
      if same:
        break
      os.close(fd)
    info = {"pid": os.getpid(), "host": socket.gethostname(),
            "started": datetime.datetime.now().isoformat(timespec="seconds"), "command": " ".join(sys.argv)}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    self._fd = fd
    return self

  def release(self) -> None:
    if self._fd is None:
      return
    try:
      os.unlink(self.path)  # while still holding it: a waiting opener then retries on a fresh file
    except FileNotFoundError:
      pass
    os.close(self._fd)
    self._fd = None

  def __enter__(self) -> OutputLock:
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


def _read_holder(fd: int) -> str:
  try:
    info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
  except (OSError, ValueError):
    info = {}
  if "pid" not in info:
    return "PID unknown"
  return f"PID {info['pid']} on {info.get('host', '?')}, started {info.get('started', '?')}"
