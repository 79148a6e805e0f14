"""Register documents to and from gRPC messages."""

from __future__ import annotations

from datetime import date
from typing import Any

from civic.registry.v1 import registry_pb2

from services.common.auth import Principal
from services.common.errors import InvalidArgument
from services.common.mongo import Document
from services.common.wire import point_message, timestamp
from services.registry import domain, events
from services.registry.store import RESIDENT, new_id


def unit_message(doc: Document) -> registry_pb2.Unit:
    return registry_pb2.Unit(
        unit_id=doc["_id"],
        kind=doc["kind"],
        name=doc["name"],
        parent_id=doc["parent_id"],
        merged_into_id=doc.get("merged_into_id", ""),
        active=doc["active"],
    )


def household_message(doc: Document) -> registry_pb2.Household:
    return registry_pb2.Household(
        household_id=doc["_id"],
        unit_id=doc["unit_id"],
        address=doc["address"],
        head_person_id=doc.get("head_person_id", ""),
        housing=events.housing(doc),
        residence_kind=doc["residence_kind"],
        location=point_message(doc.get("location")),
        last_verified_at=timestamp(doc.get("last_verified_at")),
        marked_absent=doc.get("marked_absent", False),
        external_ref=doc.get("external_ref") or "",
        created_at=timestamp(doc.get("created_at")),
        poor=doc.get("poor", False),
    )


def housing_document(housing: registry_pb2.Housing) -> Document:
    domain.check_housing(housing.floor_area_m2, housing.storeys, housing.sub_households)
    return {
        "floor_area_m2": housing.floor_area_m2,
        "storeys": housing.storeys,
        "sub_households": housing.sub_households,
    }


def check_enum(field: str, value: int, enum: Any, *, required: bool = True) -> int:
    if value == 0:
        if required:
            raise InvalidArgument(field, "is required")
        return value
    if value not in enum.values():
        raise InvalidArgument(field, f"{value} is not a known value")
    return value


class PersonCodec:
    """Person documents to and from messages; citizen IDs are sealed at rest and masked on the
    way out unless the caller may see them."""

    def __init__(self, vault: domain.CitizenIdVault) -> None:
        self.vault = vault

    def document(
        self,
        details: registry_pb2.PersonDetails,
        household: Document,
        *,
        today: date,
        field: str,
        relationship: int | None = None,
    ) -> Document:
        name = domain.person_name(f"{field}.full_name", details.full_name)
        born = domain.check_birth_date(f"{field}.birth_date", details.birth_date, today)
        sex = check_enum(f"{field}.sex", details.sex, registry_pb2.Sex)
        relation = check_enum(
            f"{field}.relationship", relationship or details.relationship, registry_pb2.Relationship
        )
        phone, email = domain.check_contact(
            f"{field}.contact", details.contact.phone, details.contact.email
        )
        doc: Document = {
            "_id": new_id("p"),
            "household_id": household["_id"],
            "unit_id": household["unit_id"],
            "full_name": name,
            "name_folded": domain.fold(name),
            "birth_date": born.isoformat(),
            "sex": sex,
            "relationship": relation,
            "education": check_enum(
                f"{field}.education", details.education, registry_pb2.EducationLevel, required=False
            ),
            "occupation": " ".join(details.occupation.split())[:120],
            "contact": {"phone": phone, "email": email},
            "status": RESIDENT,
            "residence_kind": household["residence_kind"],
            "renter": household["residence_kind"] == registry_pb2.RESIDENCE_KIND_RENTER,
            "marked_absent": False,
            "war_invalid": details.war_invalid,
            "cid_hash": None,
        }
        if details.citizen_id:
            try:
                cid = domain.check_citizen_id(details.citizen_id, born, sex)
            except InvalidArgument as error:
                raise InvalidArgument(f"{field}.citizen_id", error.problem) from None
            doc["cid_hash"] = self.vault.lookup_hash(cid)
            doc["cid_sealed"] = self.vault.seal(cid)
        return doc

    def details(self, doc: Document) -> registry_pb2.PersonDetails:
        """What a person is registered with, as a command states it (their citizen ID opened):
        a correction of some fields is checked with the others as they are."""
        contact = doc.get("contact") or {}
        return registry_pb2.PersonDetails(
            full_name=doc["full_name"],
            birth_date=doc["birth_date"],
            sex=doc["sex"],
            citizen_id=self.vault.open(doc["cid_sealed"]) if doc.get("cid_sealed") else "",
            relationship=doc["relationship"],
            education=doc.get("education", 0),
            occupation=doc.get("occupation", ""),
            contact=registry_pb2.Contact(
                phone=contact.get("phone", ""), email=contact.get("email", "")
            ),
            war_invalid=doc.get("war_invalid", False),
        )

    def message(
        self, doc: Document, caller: Principal, *, stored: bool = False
    ) -> registry_pb2.Person:
        """The person as `caller` may see them. A command's answer is `stored` for its retries:
        it never holds a citizen ID in full, which is kept only sealed."""
        cid, masked = "", False
        if doc.get("cid_sealed"):
            cid = self.vault.open(doc["cid_sealed"])
            if stored or not domain.may_see_citizen_id(caller, doc["household_id"]):
                cid, masked = domain.mask_citizen_id(cid), True
        contact = doc.get("contact") or {}
        return registry_pb2.Person(
            person_id=doc["_id"],
            household_id=doc["household_id"],
            unit_id=doc["unit_id"],
            full_name=doc["full_name"],
            birth_date=doc["birth_date"],
            sex=doc["sex"],
            citizen_id=cid,
            citizen_id_masked=masked,
            relationship=doc["relationship"],
            education=doc.get("education", 0),
            occupation=doc.get("occupation", ""),
            contact=registry_pb2.Contact(
                phone=contact.get("phone", ""), email=contact.get("email", "")
            ),
            status=doc["status"],
            residence_kind=doc["residence_kind"],
            stay_start=doc.get("stay_start", ""),
            stay_end=doc.get("stay_end", ""),
            marked_absent=doc.get("marked_absent", False),
            death_date=doc.get("death_date", ""),
            war_invalid=doc.get("war_invalid", False),
        )
