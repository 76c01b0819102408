"""The owner in tusd's ``.info`` file (:mod:`dicomproxy.tus.store`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dicomproxy.tus import errors
from dicomproxy.tus.store import FileStore, Upload


def test_the_owner_is_store_data_in_tusds_format(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    upload = store.create(Upload(id="", size=5, metadata={"filename": "a.dcm", "Owner": "mallory"}, owner="alice"))
    info = json.loads(upload.info_path.read_text())
    # tusd's FileInfo.Storage is a map[string]string: every value a string, tusd keeps the key.
    assert info["Storage"] == {"Type": "filestore", "Path": str(upload.path), "InfoPath": str(upload.info_path),
                               "Owner": "alice"}
    assert all(isinstance(v, str) for v in info["Storage"].values())
    assert info["MetaData"] == {"filename": "a.dcm", "Owner": "mallory"}  # the client's, not the owner
    assert store.owner(upload.id) == "alice" and store.get(upload.id).owner == "alice"
    store.declare_length(store.get(upload.id), 5)  # a rewrite keeps it
    assert store.owner(upload.id) == "alice"


def test_no_owner_without_a_user_and_for_tusds_files(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    upload = store.create(Upload(id="", size=1))
    assert "Owner" not in json.loads(upload.info_path.read_text())["Storage"]
    assert store.owner(upload.id) is None
    tusd = {"ID": "abc", "Size": 1, "SizeIsDeferred": False, "Offset": 0, "MetaData": {}, "IsPartial": False,
            "IsFinal": False, "PartialUploads": None, "Storage": None}
    (tmp_path / "abc.info").write_text(json.dumps(tusd))
    (tmp_path / "abc").write_bytes(b"")
    assert store.owner("abc") is None and store.get("abc").owner is None


def test_owner_of_an_unknown_upload_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(errors.TusError) as e:
        FileStore(tmp_path).owner("nope")
    assert e.value.status == 404
