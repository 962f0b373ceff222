"""Pull from and push to OCI / Ollama registries (distribution API v2), into the local store.

Pull: the manifest by `GET /v2/<ns>/<model>/manifests/<tag>`, then each missing blob by ranged
GETs in parallel parts, written into `blobs/sha256-<hex>.partial` with a record of finished
parts so that a killed or interrupted pull resumes where it stopped; each blob's sha256 is checked
before it is renamed into place and the manifest is written last, so a failed pull leaves the
store as it was. A lock per blob makes concurrent pulls of the same model safe. Retries with
backoff; bearer-token auth on a 401 challenge; `insecure` for plain-HTTP registries.
Push: `HEAD` each blob (skip what the registry has), else `POST` an upload and `PUT` the blob,
then `PUT` the manifest.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import BinaryIO, Callable

from .store import MANIFEST_TYPE, ModelName, Store, StoreError

PART_BYTES = 8 << 20
WORKERS = 4
RETRIES = 4


class RegistryError(StoreError):
    """The registry refused, was unreachable, or sent data that does not verify."""


@dataclass
class Registry:
    host: str
    insecure: bool = False
    token: str | None = None

    @property
    def base(self) -> str:
        return f"{'http' if self.insecure else 'https'}://{self.host}"

    def _auth(self, challenge: str) -> None:
        """Bearer realm="...",service="...",scope="..." -> token."""
        fields = dict(re.findall(r'(\w+)="([^"]*)"', challenge))
        if "realm" not in fields:
            raise RegistryError(f"{self.host}: unsupported auth challenge {challenge!r}")
        query = urllib.parse.urlencode({k: v for k, v in fields.items() if k in ("service", "scope")})
        with urllib.request.urlopen(f"{fields['realm']}?{query}", timeout=30) as r:
            data = json.load(r)
        self.token = data.get("token") or data.get("access_token")
        if not self.token:
            raise RegistryError(f"{self.host}: token endpoint returned no token")

    def request(self, method: str, path_or_url: str, headers: dict[str, str] | None = None,
                data: bytes | BinaryIO | None = None, ok: tuple[int, ...] = (200,)):
        url = path_or_url if path_or_url.startswith("http") else self.base + path_or_url
        last: Exception | None = None
        for attempt in range(RETRIES):
            h = dict(headers or {})
            if self.token:
                h["Authorization"] = f"Bearer {self.token}"
            if hasattr(data, "seek"):  # a streamed upload: a retry must send the body from its start
                data.seek(0)
            req = urllib.request.Request(url, data=data, headers=h, method=method)
            try:
                resp = urllib.request.urlopen(req, timeout=60)
                if resp.status in ok:
                    return resp
                resp.close()
                raise RegistryError(f"{method} {url}: unexpected status {resp.status}")
            except urllib.error.HTTPError as e:
                if e.code in ok:
                    return e
                if e.code == 401 and "Bearer" in e.headers.get("WWW-Authenticate", "") and attempt == 0:
                    self._auth(e.headers["WWW-Authenticate"])
                    continue
                if e.code < 500 and e.code != 429:
                    raise RegistryError(f"{method} {url}: HTTP {e.code} {e.reason}") from None
                last = e
            except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
                last = e
            time.sleep(min(8.0, 0.25 * 2**attempt))
        raise RegistryError(f"{method} {url}: failed after {RETRIES} tries ({last})")


def _repo(name: ModelName) -> str:
    return f"/v2/{name.namespace}/{name.model}"


def _download_blob(reg: Registry, store: Store, name: ModelName, layer: dict,
                   progress: Callable[[int], None]) -> None:
    digest, size = layer["digest"], int(layer["size"])
    final = store.blob_path(digest)
    store.blobs.mkdir(parents=True, exist_ok=True)
    lock_path = final.with_name(final.name + ".lock")
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second pull of the same blob waits, then finds it done
        if final.exists():
            progress(size)
            return
        partial = final.with_name(final.name + ".partial")
        record = final.with_name(final.name + ".parts")
        done: set[int] = set(json.loads(record.read_text())) if record.exists() and partial.exists() else set()
        if not partial.exists() or partial.stat().st_size != size:
            with open(partial, "wb") as f:
                f.truncate(size)
            done = set()
        parts = [(s, min(s + PART_BYTES, size)) for s in range(0, size, PART_BYTES)]
        progress(sum(hi - lo for lo, hi in parts if lo in done))
        fd = os.open(partial, os.O_WRONLY)
        try:
            def fetch(part: tuple[int, int]) -> int:
                lo, hi = part
                resp = reg.request("GET", f"{_repo(name)}/blobs/{digest}",
                                   {"Range": f"bytes={lo}-{hi - 1}"}, ok=(200, 206))
                with resp:
                    if resp.status == 200 and (lo, hi) != (0, size):
                        body = resp.read()[lo:hi]  # server ignored the range
                    else:
                        body = resp.read()
                if len(body) != hi - lo:
                    raise RegistryError(f"{digest}: got {len(body)} bytes for range {lo}-{hi - 1}")
                os.pwrite(fd, body, lo)
                progress(hi - lo)
                return lo

            todo = [p for p in parts if p[0] not in done]
            with ThreadPoolExecutor(max_workers=WORKERS) as pool:
                futures = [pool.submit(fetch, p) for p in todo]
                try:
                    for fut in as_completed(futures):
                        done.add(fut.result())  # the first failure (or Ctrl-C) stops here
                        record.write_text(json.dumps(sorted(done)))
                finally:  # on a failure: parts still running finish, and count for the resume
                    for fut in futures:
                        fut.cancel()
                    pool.shutdown(wait=True)
                    done.update(f.result() for f in futures if f.done() and not f.cancelled() and f.exception() is None)
                    record.write_text(json.dumps(sorted(done)))
            os.fsync(fd)
        finally:
            os.close(fd)
        h = hashlib.sha256()
        with open(partial, "rb") as f:
            while chunk := f.read(16 << 20):
                h.update(chunk)
        if "sha256:" + h.hexdigest() != digest:
            partial.unlink()
            record.unlink(missing_ok=True)
            raise RegistryError(f"{digest}: downloaded data does not match its digest (rejected)")
        os.replace(partial, final)
        record.unlink(missing_ok=True)


def pull(name_text: str, store: Store, insecure: bool = False,
         progress: Callable[[int, int], None] | None = None) -> ModelName:
    """Download a model into the store; the manifest is written only once every blob verifies."""
    name = ModelName.parse(name_text)
    reg = Registry(name.host, insecure)
    resp = reg.request("GET", f"{_repo(name)}/manifests/{name.tag}", {"Accept": MANIFEST_TYPE})
    with resp:
        raw = resp.read()
    try:
        manifest = json.loads(raw)
        layers = list(manifest["layers"]) + [manifest["config"]]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise RegistryError(f"{name}: the registry sent a malformed manifest") from None
    total = sum(int(x["size"]) for x in layers)
    got = 0

    def advance(n: int) -> None:
        nonlocal got
        got += n
        if progress:
            progress(got, total)

    for layer in layers:
        _download_blob(reg, store, name, layer, advance)
    store.write_manifest(name, manifest)
    return name


def push(src: str, target: str, store: Store, insecure: bool = False) -> int:
    """Upload a stored model's blobs (skipping those the registry has) and manifest; returns bytes sent."""
    entry = store.get(src)
    name = ModelName.parse(target)
    reg = Registry(name.host, insecure)
    sent = 0
    for layer in entry.manifest["layers"] + [entry.manifest["config"]]:
        digest = layer["digest"]
        if reg.request("HEAD", f"{_repo(name)}/blobs/{digest}", ok=(200, 404)).status == 200:
            continue
        resp = reg.request("POST", f"{_repo(name)}/blobs/uploads/", ok=(202,))
        location = resp.headers["Location"]
        if not location.startswith("http"):
            location = reg.base + location
        sep = "&" if "?" in location else "?"
        path = store.blob_path(digest)
        size = path.stat().st_size
        with open(path, "rb") as f:  # streamed, not read into memory
            reg.request("PUT", f"{location}{sep}digest={urllib.parse.quote(digest)}",
                        {"Content-Type": "application/octet-stream", "Content-Length": str(size)}, f, ok=(201,))
        sent += size
    body = json.dumps(entry.manifest).encode()
    reg.request("PUT", f"{_repo(name)}/manifests/{name.tag}", {"Content-Type": MANIFEST_TYPE}, body, ok=(201,))
    return sent
