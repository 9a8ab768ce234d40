"""The designer keeps a module's other files (app.env...) so a built module can start."""

from __future__ import annotations

from pathlib import Path

from app.designer import DesignerModel


def test_template_files_are_written_with_the_forms_values(tmp_path: Path) -> None:
    dm = DesignerModel.from_template("mirror")
    assert dm.set_field(("module", "name"), "web")
    assert dm.set_field(("vip", 0, "address"), "198.51.100.201")
    assert dm.set_field(("dir", 0), "/srv/web")
    root = dm.save(tmp_path / "web")
    env = (root / "app.env").read_text()
    assert "HTTP_ADDRESS=198.51.100.201" in env
    assert "DATA_DIR=/srv/web" in env
    assert "@" not in env.split("\n", 1)[1]  # every token replaced
    assert (root / "app.env").stat().st_mode & 0o777 == 0o644
    assert (root / "bin" / "start_prim").exists()


def test_a_module_directory_keeps_its_files_as_they_are(tmp_path: Path) -> None:
    first = DesignerModel.from_template("mirror").save(tmp_path / "one")
    (first / "notes.txt").write_text("keep me\n")
    again = DesignerModel.from_dir(first).save(tmp_path / "two")
    assert (again / "notes.txt").read_text() == "keep me\n"
    assert (again / "app.env").read_text() == (first / "app.env").read_text()
