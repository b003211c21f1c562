"""Migration to user_version 3: a report's SBOM moves from reports.sbom into report_sbom_pieces, byte for byte."""
import json
import sqlite3

import web
from support import REPO

V1_SCHEMA = REPO / "tests" / "data" / "schema-v1.sql"  # schema.sql as of user_version 1


def version_1_database(path, sbom_bytes):
    conn = sqlite3.connect(path)
    conn.executescript(V1_SCHEMA.read_text())
    conn.execute("INSERT INTO reports (id, name, root, sbom, tree, created_at) VALUES (1, 'old', '/nix/store/x', ?, '[]',"
                 " '2024-01-01T00:00:00Z')", (sbom_bytes,))
    conn.commit()
    conn.close()


def test_a_version_1_report_keeps_its_sbom_after_migration(tmp_path):
    sbom_bytes = json.dumps({"bomFormat": "CycloneDX", "ünïcode": True}).encode()
    version_1_database(tmp_path / "v1.db", sbom_bytes)
    app = web.create_app({"DATABASE": str(tmp_path / "v1.db"), "TESTING": True})
    response = app.test_client().get("/reports/old", headers={"Accept": "application/vnd.cyclonedx+json"})
    assert response.get_data() == sbom_bytes
    with sqlite3.connect(tmp_path / "v1.db") as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == web.SCHEMA_VERSION
        assert "sbom" not in [row[1] for row in conn.execute("PRAGMA table_info(reports)")]
