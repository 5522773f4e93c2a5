"""What a simulated cluster looks like: hosts, an optional LAN, and cables.

A spec is JSON, YAML or the same structure as Python dicts::

    {"name": "demo3",                              # optional, default "sim"
     "hosts": [{"name": "a", "cores": [0], "memory": "4G"},
               {"name": "b"}, {"name": "c"}],
     "lan": {"rate": "1gbit"},                     # optional
     "links": [{"a": "a", "b": "b", "rate": "100mbit", "delay": "5ms", "loss": 0.0}]}

``hosts`` (required, at least one; a bare string is just a name)
    ``name``: lower-case letters, digits, ``-`` and ``_`` (``lan`` is reserved).
    ``cores``: optional CPU numbers the host's processes may run on, as a list
    (``[0, 1]``), a number, or cpuset text (``"0-1"``); ``memory``: optional
    memory limit (``"4G"``, ``"512M"`` or bytes). Both become cgroup v1 limits
    when the machine allows it, and are skipped with a log message otherwise
    (cores this machine does not have are an error when the sim starts).
``lan`` (optional)
    A switch joining every host. Present (even as ``{}``) means a LAN;
    absent or ``null`` means none. ``rate``: optional port speed, applied to
    each host's port in each direction.
``links`` (optional)
    Point-to-point cables between two hosts ``a`` and ``b``. ``rate``:
    optional speed per direction; ``delay``: **one-way** latency per direction
    (so a ping's round trip takes ``2 * delay``), default ``0ms``; ``loss``:
    probability in [0, 1) that a frame is dropped, per direction.

Rates are tc-style: ``"100mbit"``, ``"1gbit"`` (bits per second), while
``"10mbps"`` means 10 mega*bytes* per second, as in tc. Delays are ``"5ms"``
or ``"500us"``; a bare number in a file is milliseconds (the ``LinkSpec.delay``
field itself holds seconds). Sizes are ``"4G"``, ``"512M"`` (binary). See
:mod:`exo_lab.sim.units`. How names and addresses are assigned:
:mod:`exo_lab.sim.layout`.

The command-line form builds the same thing: ``--nodes 3`` names hosts
``a``, ``b``, ``c`` ...; ``--link a-b:rate=1gbit,delay=2ms,loss=0.01`` adds a
cable; ``--no-lan`` drops the LAN and ``--lan-rate 1gbit`` shapes it.
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import yaml

from exo_lab.sim import units

_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9_-]{0,30}[a-z0-9])?$")
RESERVED_HOST_NAMES = frozenset({"lan"})
MAX_HOSTS = 200
MAX_LINKS = 64


class SpecError(ValueError):
    """A simulated-cluster spec that cannot be built; the message says what to fix."""


def _check_name(kind: str, name: object) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise SpecError(
            f"{kind} name {name!r} is not valid: use 1-32 lower-case letters, digits, '-' or '_', "
            "starting and ending with a letter or digit"
        )
    return name


def _check_keys(where: str, data: Mapping[str, Any], known: Iterable[str]) -> None:
    known = tuple(known)
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise SpecError(f"unknown key(s) {', '.join(map(repr, unknown))} in {where}; known keys: {', '.join(known)}")


def parse_cores(value: object) -> tuple[int, ...]:
    """CPU numbers from ``[0, 1]``, ``3`` or cpuset text ``"0-2,4"``."""
    if isinstance(value, bool):
        raise SpecError(f"cores must be a list of CPU numbers, not {value!r}")
    if isinstance(value, int):
        cores = [value]
    elif isinstance(value, str):
        cores = []
        for part in value.replace(" ", "").split(","):
            m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
            if not m:
                raise SpecError(f"cannot read cores {value!r}; write a list like [0, 1] or text like '0-1,3'")
            lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
            if hi < lo:
                raise SpecError(f"core range {part!r} runs backwards")
            cores.extend(range(lo, hi + 1))
    elif isinstance(value, Sequence):
        cores = list(value)
        if not all(isinstance(c, int) and not isinstance(c, bool) for c in cores):
            raise SpecError(f"cores must be CPU numbers, got {value!r}")
    else:
        raise SpecError(f"cores must be a list of CPU numbers, got {value!r}")
    if not cores:
        raise SpecError("cores must name at least one CPU (omit the key for no limit)")
    if any(c < 0 for c in cores):
        raise SpecError(f"CPU numbers must be >= 0, got {value!r}")
    if len(set(cores)) != len(cores):
        raise SpecError(f"cores {value!r} lists a CPU twice")
    return tuple(sorted(cores))


@dataclass(frozen=True)
class HostSpec:
    """One simulated machine: its name and optional CPU and memory limits."""

    name: str
    cores: tuple[int, ...] | None = None
    memory: int | None = None  # bytes

    def __post_init__(self) -> None:
        _check_name("host", self.name)
        if self.name in RESERVED_HOST_NAMES:
            raise SpecError(f"host name {self.name!r} is reserved; pick another")
        if self.cores is not None:
            object.__setattr__(self, "cores", parse_cores(self.cores))
        if self.memory is not None:
            try:
                memory = units.parse_size(self.memory)
            except ValueError as exc:
                raise SpecError(f"host {self.name!r}: {exc}") from None
            if memory < 16 * 2**20:
                raise SpecError(f"host {self.name!r}: memory {self.memory!r} is below 16M; a node cannot run in that")
            object.__setattr__(self, "memory", memory)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name}
        if self.cores is not None:
            out["cores"] = list(self.cores)
        if self.memory is not None:
            out["memory"] = units.format_size(self.memory)
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | str) -> HostSpec:
        if isinstance(data, str):
            return cls(name=data)
        if not isinstance(data, Mapping):
            raise SpecError(f"a host must be a mapping like {{'name': 'a'}}, got {data!r}")
        _check_keys(f"host {data.get('name', '?')!r}", data, ("name", "cores", "memory"))
        if "name" not in data:
            raise SpecError(f"host {dict(data)!r} has no 'name'")
        return cls(name=data["name"], cores=data.get("cores"), memory=data.get("memory"))


@dataclass(frozen=True)
class LanSpec:
    """A switch joining all hosts; ``rate`` (bit/s) shapes each port, both directions."""

    rate: int | None = None

    def __post_init__(self) -> None:
        if self.rate is not None:
            try:
                object.__setattr__(self, "rate", units.parse_rate(self.rate))
            except ValueError as exc:
                raise SpecError(f"lan: {exc}") from None

    def to_json(self) -> dict[str, Any]:
        return {} if self.rate is None else {"rate": units.format_rate(self.rate)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LanSpec:
        if not isinstance(data, Mapping):
            raise SpecError(f"lan must be a mapping like {{'rate': '1gbit'}} (or omitted), got {data!r}")
        _check_keys("lan", data, ("rate",))
        return cls(rate=data.get("rate"))


@dataclass(frozen=True)
class LinkSpec:
    """A cable between hosts ``a`` and ``b``; ``delay`` is one-way seconds, so RTT = 2 * delay."""

    a: str
    b: str
    rate: int | None = None  # bit/s per direction
    delay: float = 0.0  # one-way seconds, per direction
    loss: float = 0.0  # drop probability per frame, per direction

    def __post_init__(self) -> None:
        _check_name("link end", self.a)
        _check_name("link end", self.b)
        if self.a == self.b:
            raise SpecError(f"link {self.a}-{self.b} joins a host to itself; a link needs two different hosts")
        where = f"link {self.a}-{self.b}"
        try:
            if self.rate is not None:
                object.__setattr__(self, "rate", units.parse_rate(self.rate))
            object.__setattr__(
                self, "delay", units.parse_delay(self.delay) if isinstance(self.delay, str) else float(self.delay)
            )
        except ValueError as exc:
            raise SpecError(f"{where}: {exc}") from None
        if not 0.0 <= self.delay <= 10.0:
            raise SpecError(f"{where}: delay must be between 0 and 10 s, got {self.delay!r} s")
        if isinstance(self.loss, bool) or not isinstance(self.loss, (int, float)) or not 0.0 <= self.loss < 1.0:
            raise SpecError(f"{where}: loss must be a probability in [0, 1), got {self.loss!r}")
        object.__setattr__(self, "loss", float(self.loss))

    @property
    def label(self) -> str:
        return f"{self.a}-{self.b}"

    @property
    def rtt(self) -> float:
        """Round trip over this cable in seconds, ignoring serialization: ``2 * delay``."""
        return 2 * self.delay

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"a": self.a, "b": self.b}
        if self.rate is not None:
            out["rate"] = units.format_rate(self.rate)
        out["delay"] = units.format_delay(self.delay)
        out["loss"] = self.loss
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LinkSpec:
        if not isinstance(data, Mapping):
            raise SpecError(f"a link must be a mapping like {{'a': 'a', 'b': 'b', 'delay': '5ms'}}, got {data!r}")
        _check_keys(f"link {data.get('a', '?')}-{data.get('b', '?')}", data, ("a", "b", "rate", "delay", "loss"))
        if "a" not in data or "b" not in data:
            raise SpecError(f"link {dict(data)!r} needs both ends, 'a' and 'b'")
        delay: Any = data.get("delay", 0.0)  # seconds or a string like "5ms": __post_init__ parses it
        if isinstance(delay, (int, float)) and not isinstance(delay, bool):
            delay = f"{delay}ms"  # bare numbers in files are milliseconds
        return cls(a=data["a"], b=data["b"], rate=data.get("rate"), delay=delay, loss=data.get("loss", 0.0))

    @classmethod
    def from_flag(cls, text: str) -> LinkSpec:
        """``"a-b:rate=1gbit,delay=2ms,loss=0.01"`` (options optional)."""
        ends, _, opts = text.partition(":")
        names = ends.split("-")
        if len(names) != 2:
            raise SpecError(
                f"--link {text!r}: write the ends as 'a-b' then ':key=value,...', e.g. a-b:rate=1gbit,delay=2ms"
            )
        data: dict[str, Any] = {"a": names[0].strip(), "b": names[1].strip()}
        for item in filter(None, opts.split(",")):
            key, eq, value = item.partition("=")
            if not eq:
                raise SpecError(f"--link {text!r}: option {item!r} is not key=value")
            key = key.strip()
            data[key] = float(value) if key == "loss" else value.strip()
        return cls.from_json(data)


def host_names(count: int) -> list[str]:
    """``a``, ``b``, ... ``z``, ``aa``, ``ab`` ...: the host names of ``--nodes N``."""
    letters = string.ascii_lowercase
    names = []
    for i in range(count):
        name, n = "", i
        while True:
            name = letters[n % 26] + name
            n = n // 26 - 1
            if n < 0:
                break
        names.append(name)
    return names


@dataclass(frozen=True)
class SimSpec:
    """A whole simulated cluster. Build it from a dict, a file or CLI flags."""

    name: str = "sim"
    hosts: tuple[HostSpec, ...] = ()
    lan: LanSpec | None = field(default_factory=LanSpec)
    links: tuple[LinkSpec, ...] = ()

    def __post_init__(self) -> None:
        _check_name("sim", self.name)
        object.__setattr__(self, "hosts", tuple(self.hosts))
        object.__setattr__(self, "links", tuple(self.links))
        if not self.hosts:
            raise SpecError(f"sim {self.name!r} has no hosts; add at least one, e.g. hosts: [{{name: a}}]")
        if len(self.hosts) > MAX_HOSTS:
            raise SpecError(f"sim {self.name!r} has {len(self.hosts)} hosts; at most {MAX_HOSTS} are supported")
        if len(self.links) > MAX_LINKS:
            raise SpecError(f"sim {self.name!r} has {len(self.links)} links; at most {MAX_LINKS} are supported")
        names = [h.name for h in self.hosts]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise SpecError(f"host name(s) {', '.join(dupes)} appear more than once; host names must be unique")
        for link in self.links:
            for end in (link.a, link.b):
                if end not in names:
                    raise SpecError(f"link {link.label} names host {end!r}, which is not in hosts ({', '.join(names)})")

    def host(self, name: str) -> HostSpec:
        for h in self.hosts:
            if h.name == name:
                return h
        raise KeyError(f"no host {name!r} in sim {self.name!r}; hosts are {', '.join(h.name for h in self.hosts)}")

    def links_of(self, host: str) -> list[tuple[int, LinkSpec]]:
        """``(index, link)`` for every cable that ends at ``host``."""
        return [(i, link) for i, link in enumerate(self.links) if host in (link.a, link.b)]

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "hosts": [h.to_json() for h in self.hosts],
            "lan": None if self.lan is None else self.lan.to_json(),
            "links": [link.to_json() for link in self.links],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], name: str | None = None) -> SimSpec:
        """Build from the dict form; ``name`` is used when the dict has none."""
        if not isinstance(data, Mapping):
            raise SpecError(f"a sim spec must be a mapping with 'hosts', got {type(data).__name__}")
        _check_keys("the sim spec", data, ("name", "hosts", "lan", "links"))
        hosts = data.get("hosts")
        if not isinstance(hosts, Sequence) or isinstance(hosts, str):
            raise SpecError("a sim spec needs 'hosts', a list like [{'name': 'a'}, {'name': 'b'}]")
        links = data.get("links") or []
        if not isinstance(links, Sequence) or isinstance(links, str):
            raise SpecError("'links' must be a list of {'a': ..., 'b': ..., 'delay': ...}")
        lan = data.get("lan")
        return cls(
            name=data.get("name") or name or "sim",
            hosts=tuple(HostSpec.from_json(h) for h in hosts),
            lan=None if lan is None or lan is False else LanSpec.from_json({} if lan is True else lan),
            links=tuple(LinkSpec.from_json(link) for link in links),
        )

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2)

    @classmethod
    def from_file(cls, path: str | Path) -> SimSpec:
        """Read a ``.json``, ``.yaml`` or ``.yml`` spec; the name defaults to the file's stem."""
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise SpecError(f"cannot read sim spec {path}: {exc.strerror}") from None
        if path.suffix.lower() == ".json":
            try:
                data = json.loads(text)
            except json.JSONDecodeError as exc:
                raise SpecError(f"{path} is not valid JSON: {exc}") from None
        else:
            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as exc:
                raise SpecError(f"{path} is not valid YAML: {exc}") from None
        return cls.from_json(data or {}, name=path.stem.replace(".", "-").lower())

    @classmethod
    def from_flags(
        cls,
        nodes: int,
        links: Sequence[str] = (),
        lan: bool = True,
        lan_rate: str | None = None,
        name: str = "sim",
    ) -> SimSpec:
        """The ``--nodes N --link a-b:rate=...,delay=... [--no-lan] [--lan-rate R]`` form."""
        if nodes < 1:
            raise SpecError(f"--nodes must be at least 1, got {nodes}")
        if lan_rate is not None and not lan:
            raise SpecError("--lan-rate needs a LAN; drop --no-lan or --lan-rate")
        return cls(
            name=name,
            hosts=tuple(HostSpec(n) for n in host_names(nodes)),
            lan=LanSpec(rate=cast(Any, lan_rate)) if lan else None,  # a string: LanSpec.__post_init__ parses it
            links=tuple(LinkSpec.from_flag(text) for text in links),
        )

    @classmethod
    def coerce(cls, spec: SimSpec | Mapping[str, Any] | str | Path) -> SimSpec:
        """A SimSpec from a SimSpec, its dict form, or a path to a spec file."""
        if isinstance(spec, SimSpec):
            return spec
        if isinstance(spec, Mapping):
            return cls.from_json(spec)
        if isinstance(spec, (str, Path)):
            return cls.from_file(spec)
        raise SpecError(f"cannot build a SimSpec from {type(spec).__name__}; pass a dict, a path or a SimSpec")
