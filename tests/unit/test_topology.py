import pytest

from exo_lab.cluster.topology import LinkProfile, NodeInfo, Topology
from tests.helpers.paths import SPECS


def topo():
    nodes = {
        i: NodeInfo(i, f"n{i}", [f"10.0.0.{k}"], profile={"memory_total_bytes": 8 << 30}) for k, i in enumerate("abc")
    }
    links = [
        LinkProfile("a", "b", "10.0.0.0", "10.0.0.1", 0.2, 0.3, 900, 880),
        LinkProfile("a", "b", "10.9.0.1", "10.9.0.2", 10.0, 12.0, 95, 94),
        LinkProfile("b", "c", "10.0.0.1", "10.0.0.2", 5.0, 6.0, 50, 50),
        LinkProfile("a", "c", "x", "10.0.0.2", error="ConnectionRefusedError"),
    ]
    return Topology(nodes, links)


def test_best_link_prefers_bandwidth_and_flips_reverse_measurements():
    t = topo()
    assert t.best_link("a", "b").dst_address == "10.0.0.1"
    back = t.best_link("c", "b")
    assert back.src == "c" and back.dst == "b" and back.rtt_ms_median == 5.0
    assert t.best_link("a", "c") is None  # only a failed measurement


def test_every_pairs_paths_at_once_are_those_between_them():
    t = topo()
    t.links.append(LinkProfile("b", "a", "10.0.0.1", "10.0.0.0", 0.1, 0.2, 900, 900))  # measured both ways
    paths = t.paths()
    for a in "abc":
        for b in "abc":
            if a != b:
                assert paths.get((a, b), []) == t.links_between(a, b), (a, b)
    assert [p.src_address for p in paths["a", "b"]] == ["10.0.0.0", "10.9.0.1", "10.0.0.0"]  # then the flipped one


def test_json_round_trip_and_validation():
    t = topo()
    again = Topology.from_json(t.to_json())
    assert again.to_json() == t.to_json()
    bad = t.to_json()
    bad["links"].append({"src": "a", "dst": "zz", "src_address": None, "dst_address": "1.2.3.4"})
    with pytest.raises(ValueError, match="not in the topology"):
        Topology.from_json(bad)
    with pytest.raises(ValueError, match="version"):
        Topology.from_json({"version": 99})


def test_networkx_view():
    g = topo().to_networkx()
    assert set(g.nodes) == {"a", "b", "c"}
    assert g.edges["a", "b"]["bandwidth_mbit_per_s"] == 880
    assert not g.has_edge("a", "c")


@pytest.mark.parametrize("spec", sorted(p.name for p in SPECS.glob("*.json")))
def test_shipped_what_if_specs_load(spec):
    t = Topology.load(SPECS / spec)
    assert len(t.nodes) >= 2
    for n in t.nodes.values():
        assert n.memory_total_bytes > 0 and n.profile["memory_bandwidth_gb_per_s"] > 0
    ids = sorted(t.nodes)
    assert all(t.best_link(a, b) for a in ids for b in ids if a < b)
