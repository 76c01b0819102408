"""The request identifier of C-FIND, C-MOVE and C-GET as scripts see it, and the status data sets
the services answer with."""

from __future__ import annotations

from pydicom.dataset import Dataset

from dicomproxy.dicom import datasets
from dicomproxy.dicom.session import AssocSession, LuaBridge


def status_dataset(status: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = status
    ds.ErrorComment = comment[:64]
    return ds


def edit(bridge: LuaBridge, session: AssocSession, identifier: Dataset, event_name: str) -> tuple[Dataset, str | None]:
    """Run ``event_name`` (onCFind/onCMove/onCGet) and, for C-FIND, ``IncomingFindRequestFilter``
    on ``identifier``. Returns the edited identifier and, if a script refused, why."""
    table = datasets.dataset_to_table(identifier)
    d = bridge.call(event_name, table, session.table(), session=session)
    if d is not None:
        if d.rejected:
            return identifier, f"refused by {event_name}"
        edited = d.args[0] if d.args and isinstance(d.args[0], dict) else table
        datasets.apply_table(identifier, table, edited)
    if event_name == "onCFind" and bridge.defines("IncomingFindRequestFilter"):
        table = datasets.dataset_to_table(identifier)
        d = bridge.call("IncomingFindRequestFilter", table, session.origin(), session=session)
        if d is not None:
            if d.rejected:
                return identifier, "refused by IncomingFindRequestFilter"
            returned = [r for r in d.results if isinstance(r, dict)]
            edited = returned[-1] if returned else (d.args[0] if d.args and isinstance(d.args[0], dict) else table)
            datasets.apply_table(identifier, table, edited)
    return identifier, None


def decoded(identifier: Dataset) -> Dataset:
    """Decode every element now, so a bad identifier fails here (raises what pydicom raises)."""
    for _elem in identifier:
        pass
    return identifier
