"""PUT /reports accepts the SBOM shapes real tools emit and maps each to output paths and a tree."""
import json
import sqlite3

import pytest

import sbom_samples as samples
from support import bearer
import web
from web import NO_BUILDS

JSON = {"Accept": "application/json"}


@pytest.fixture
def token(tokens):
    return tokens("alice")


def define(client, token, name, closure):
    response = client.put(f"/reports/{name}", json=closure.sbom, headers=bearer(token))
    assert response.status_code == 200, response.get_json()
    return response


def summary(client, name):
    return client.get(f"/reports/{name}", headers=JSON).get_json()


def tree_lines(client, name):
    """The text tree as (depth, path, rest) triples."""
    text = client.get(f"/reports/{name}", headers={"Accept": "text/plain"}).get_data(as_text=True)
    lines = []
    for line in text.splitlines():
        stripped = line.lstrip(" ")
        depth, remainder = divmod(len(line) - len(stripped), 2)
        assert remainder == 0, f"odd indentation in {line!r}"
        path, _, rest = stripped.partition(" ")
        lines.append((depth, path, rest))
    return lines


def diamond_tree(closure):
    out = closure.out
    return [
        (0, out("app"), NO_BUILDS),
        (1, out("left"), NO_BUILDS),
        (2, out("shared"), NO_BUILDS),
        (3, out("leaf"), NO_BUILDS),
        (1, out("right"), NO_BUILDS),
        (2, out("shared"), "(shown above)"),
    ]


@pytest.mark.parametrize("property_name", ["nix:out_path", "nix:output_path"])
def test_nix_build_sbom_yields_every_output_path(client, token, property_name):
    closure = samples.nix_build_sbom(samples.DIAMOND, property_name)
    define(client, token, "diamond", closure)
    assert set(summary(client, "diamond")["paths"]) == closure.all_paths


@pytest.mark.parametrize("property_name", ["nix:out_path", "nix:output_path"])
def test_nix_build_sbom_root_is_the_root_output_path(client, token, property_name):
    closure = samples.nix_build_sbom(samples.DIAMOND, property_name)
    define(client, token, "diamond", closure)
    report = summary(client, "diamond")
    assert report["root"] == closure.root
    assert closure.root in report["paths"]


@pytest.mark.parametrize("property_name", ["nix:out_path", "nix:output_path"])
def test_nix_build_sbom_tree_shows_shared_subtree_once(client, token, property_name):
    closure = samples.nix_build_sbom(samples.DIAMOND, property_name)
    define(client, token, "diamond", closure)
    assert tree_lines(client, "diamond") == diamond_tree(closure)


def test_sbomnix_drv_refs_map_to_output_paths(client, token):
    closure = samples.sbomnix_sbom(samples.DIAMOND)
    define(client, token, "sbomnix", closure)
    report = summary(client, "sbomnix")
    assert set(report["paths"]) == closure.all_paths
    assert not any(path.endswith(".drv") for path in report["paths"])


def test_sbomnix_component_with_several_outputs_contributes_each(client, token):
    closure = samples.sbomnix_sbom(samples.DIAMOND, outputs={"shared": ["out", "dev", "lib"]})
    define(client, token, "sbomnix", closure)
    paths = set(summary(client, "sbomnix")["paths"])
    assert set(closure.outputs["shared"]) <= paths
    assert len(closure.outputs["shared"]) == 3
    assert paths == closure.all_paths


def test_sbomnix_root_is_an_output_path_not_the_drv(client, token):
    closure = samples.sbomnix_sbom(samples.DIAMOND)
    define(client, token, "sbomnix", closure)
    assert summary(client, "sbomnix")["root"] == closure.root


def test_sbomnix_tree_follows_drv_dependencies(client, token):
    closure = samples.sbomnix_sbom(samples.DIAMOND)
    define(client, token, "sbomnix", closure)
    assert tree_lines(client, "sbomnix") == diamond_tree(closure)


def test_sbomnix_tree_lists_every_output_of_a_component_at_its_depth(client, token):
    closure = samples.sbomnix_sbom(samples.DIAMOND, outputs={"shared": ["out", "dev", "lib"]})
    define(client, token, "sbomnix", closure)
    lines = tree_lines(client, "sbomnix")
    shared = set(closure.outputs["shared"])
    first = [line for line in lines if line[1] in shared and line[2] == NO_BUILDS]
    repeated = [line for line in lines if line[1] in shared and line[2] == "(shown above)"]
    assert {(depth, path) for depth, path, _ in first} == {(2, path) for path in shared}
    assert {(depth, path) for depth, path, _ in repeated} == {(2, path) for path in shared}
    assert (3, closure.out("leaf"), NO_BUILDS) in lines


def test_bombon_basenames_become_full_store_paths(client, token):
    closure = samples.bombon_sbom(samples.DIAMOND)
    define(client, token, "bombon", closure)
    report = summary(client, "bombon")
    assert set(report["paths"]) == closure.all_paths
    assert all(path.startswith("/nix/store/") for path in report["paths"])


def test_bombon_root_is_a_full_store_path(client, token):
    closure = samples.bombon_sbom(samples.DIAMOND)
    define(client, token, "bombon", closure)
    assert summary(client, "bombon")["root"] == closure.root


def test_bombon_tree_follows_basename_dependencies(client, token):
    closure = samples.bombon_sbom(samples.DIAMOND)
    define(client, token, "bombon", closure)
    assert tree_lines(client, "bombon") == diamond_tree(closure)


def test_odd_sbom_is_accepted(client, token):
    define(client, token, "odd", samples.odd_sbom())


def test_odd_sbom_yields_every_component_path(client, token):
    closure = samples.odd_sbom()
    define(client, token, "odd", closure)
    assert set(summary(client, "odd")["paths"]) == closure.all_paths


def test_dangling_depends_on_ref_is_not_a_report_path(client, token):
    closure = samples.odd_sbom()
    define(client, token, "odd", closure)
    assert closure.dangling not in summary(client, "odd")["paths"]
    assert closure.dangling not in {path for _, path, _ in tree_lines(client, "odd")}


def test_depends_on_entries_that_are_not_refs_are_dropped_and_the_rest_kept(client, token):
    """A list, object, number or null among dependsOn names no component; the refs beside them still make edges."""
    closure = samples.odd_sbom()
    out = closure.out
    closure.sbom["dependencies"][1]["dependsOn"] = [[out("what?")], {"ref": out("what?")}, 7, None, out("what?")]
    define(client, token, "odd", closure)
    assert tree_lines(client, "odd")[1:3] == [(1, out("notype"), NO_BUILDS), (2, out("what?"), NO_BUILDS)]


def test_name_with_question_mark_is_a_report_path(client, token):
    closure = samples.odd_sbom()
    define(client, token, "odd", closure)
    assert closure.out("what?") in summary(client, "odd")["paths"]


def test_component_without_dependencies_entry_still_appears_in_tree(client, token):
    closure = samples.odd_sbom()
    define(client, token, "odd", closure)
    assert (0, closure.out("orphan"), NO_BUILDS) in tree_lines(client, "odd")


def test_odd_sbom_tree(client, token):
    closure = samples.odd_sbom()
    define(client, token, "odd", closure)
    out = closure.out
    assert tree_lines(client, "odd") == [
        (0, out("odd-root"), NO_BUILDS),
        (1, out("notype"), NO_BUILDS),
        (2, out("what?"), NO_BUILDS),
        (1, out("stringver"), NO_BUILDS),
        (0, out("orphan"), NO_BUILDS),
    ]


def test_cycle_is_shown_once_then_referenced(client, token):
    closure = samples.nix_build_sbom(samples.CYCLE)
    define(client, token, "cycle", closure)
    out = closure.out
    assert tree_lines(client, "cycle") == [
        (0, out("cyc-root"), NO_BUILDS),
        (1, out("cyc-a"), NO_BUILDS),
        (2, out("cyc-b"), NO_BUILDS),
        (3, out("cyc-a"), "(shown above)"),
    ]


ODD_NAMES = {"left": 'line\nbreak, "quotes", \\u0000 and \\', "right": "é ✓ 🙂 \u202eevil\x01", "leaf": ""}


def test_every_row_is_stored_as_uploaded_whatever_its_text(app, client, token):
    """Rows go to SQLite as JSON (json_each): names with escapes and any Unicode come back unchanged."""
    closure = samples.nix_build_sbom(samples.DIAMOND, names=ODD_NAMES)
    closure.sbom["components"][-1]["properties"] = [{"name": "nix:output_path", "value": closure.outputs["leaf"][0]}]
    define(client, token, "odd-text", closure)
    with sqlite3.connect(app.config["DATABASE"]) as conn:
        (report_id,) = conn.execute("SELECT id FROM reports WHERE name = 'odd-text'").fetchone()
        pieces = conn.execute("SELECT piece FROM report_component_pieces WHERE report_id = ? ORDER BY seq",
                              (report_id,)).fetchall()
        paths = conn.execute("SELECT out_path, component_idx, output, ca, digest, drv_path FROM report_paths"
                             " WHERE report_id = ?", (report_id,)).fetchall()
    expected = [(ODD_NAMES.get(name, name), samples.drv_path(name) if name != "leaf" else None) for name in samples.DIAMOND]
    assert [tuple(component) for (piece,) in pieces for component in json.loads(piece)] == expected
    assert sorted(paths) == sorted((closure.outputs[name][0], index, "out" if name != "leaf" else None, None,
                                    web.path_digest(closure.outputs[name][0]), drv_path)
                                   for index, (name, (_name, drv_path)) in enumerate(zip(samples.DIAMOND, expected)))


@pytest.mark.parametrize("field", ["name", "nix:output"])
def test_a_nul_character_in_a_name_is_refused_not_cut_short(client, token, field):
    closure = samples.nix_build_sbom(samples.DIAMOND)
    component = closure.sbom["components"][1]
    if field == "name":
        component["name"] = "cut\x00short"
    else:
        component["properties"][2]["value"] = "cut\x00short"
    response = client.put("/reports/nul", json=closure.sbom, headers=bearer(token))
    assert response.status_code == 400
    assert f"{field} 'cut\\x00short' holds a NUL character" in response.get_json()["error"]
    assert client.get("/reports/nul", headers=JSON).status_code == 404
