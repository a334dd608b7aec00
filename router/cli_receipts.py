"""``router receipts ...`` and ``router verify``: signing keys, a tenant's signed export for an
auditor, and the check that finds any edited, inserted, reordered or deleted receipt."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from router.receipts import ReceiptError, Report, Signer, public_key_from


def _key_path(args: argparse.Namespace) -> str:
    return str(args.key or f"{args.ledger}.key")


def _month(value: str) -> tuple[datetime, datetime]:
    try:
        start = datetime.strptime(value, "%Y-%m").replace(tzinfo=UTC)
    except ValueError:
        raise SystemExit(f"error: --month {value!r} is not YYYY-MM") from None
    end = (
        start.replace(year=start.year + 1, month=1)
        if start.month == 12
        else start.replace(month=start.month + 1)
    )
    return start, end


def _when(value: str | None, name: str) -> datetime | None:
    if value is None:
        return None
    try:
        ts = datetime.fromisoformat(value)
    except ValueError as e:
        raise SystemExit(f"error: {name} {value!r}: {e}") from None
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)


def cmd_keygen(args: argparse.Namespace) -> int:
    if Path(args.path).exists():
        raise SystemExit(f"error: {args.path} exists; a signing key is never overwritten")
    signer = Signer.load(args.path, create=True)
    print(f"made {args.path} (keep it secret and backed up)")
    print(f"public key {signer.public_key} (id {signer.key_id}): publish it to auditors")
    return 0


def cmd_public_key(args: argparse.Namespace) -> int:
    signer = Signer.load(args.path)
    print(signer.public_key)
    return 0


def cmd_sign(args: argparse.Namespace) -> int:
    from router.cli import _open_ledger
    from router.receipts import sign_heads

    ledger = _open_ledger(args.ledger)
    n = sign_heads(ledger, Signer.load(_key_path(args)))
    print(f"signed {n} chain heads")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from router.cli import _check_tenant, _open_ledger
    from router.receipts import export

    ledger = _open_ledger(args.ledger)
    _check_tenant(ledger, args.tenant)
    if args.month and (args.from_ or args.to):
        raise SystemExit("error: give --month or --from/--to, not both")
    start, end = (
        _month(args.month) if args.month else (_when(args.from_, "--from"), _when(args.to, "--to"))
    )
    signer = Signer.load(_key_path(args))
    out = open(args.output, "wb") if args.output != "-" else sys.stdout.buffer  # noqa: SIM115
    try:
        trailer = export(ledger, args.tenant, start, end, signer, out)
    finally:
        if out is not sys.stdout.buffer:
            out.close()
    print(
        f"exported {trailer['count']} receipts of {args.tenant} (chained in "
        f"{start.isoformat() if start else 'the beginning'} .. "
        f"{end.isoformat() if end else 'now'}), signed by key {signer.key_id}",
        file=sys.stderr,
    )
    return 0


def _trusted(values: list[str] | None) -> list[str] | None:
    if not values:
        return None
    keys = []
    for v in values:
        p = Path(v)
        text = p.read_text() if p.is_file() else v
        if p.is_file() and "PRIVATE KEY" in text:
            keys.append(Signer.load(p).public_key)  # the operator checking its own ledger
        else:
            keys.append(public_key_from(text))
    return keys


def _print(report: Report, as_json: bool, what: str) -> int:
    if as_json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        verdict = "OK" if report.ok else "FAILED"
        print(f"{what}: {verdict}: {report.rows} receipts of {report.tenants} tenants, "
              f"{report.signatures} signed heads checked")  # fmt: skip
        for p in report.problems:
            print(f"  problem: {p}")
        if report.more_problems:
            print(f"  ... and {report.more_problems} more problems")
        for n in report.notes:
            print(f"  note: {n}")
    return 0 if report.ok else 1


def cmd_verify(args: argparse.Namespace) -> int:
    from router.receipts import verify_export_file, verify_ledger

    trusted = _trusted(args.public_key)
    if bool(args.export) == bool(args.ledger):
        raise SystemExit("error: give an export file or --ledger (one of them)")
    if args.ledger:
        from router.cli import _open_ledger

        ledger = _open_ledger(args.ledger)
        record_path = Path(args.signer_record or f"{args.ledger}.key.heads")
        record = None
        if record_path.is_file():
            import orjson

            try:
                raw = orjson.loads(record_path.read_bytes())
                record = {str(t): (int(v[0]), str(v[1])) for t, v in raw.items()}
            except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError) as e:
                raise SystemExit(f"error: {record_path}: not a signer's record: {e}") from None
        elif args.signer_record:
            raise SystemExit(f"error: no signer's record at {record_path}")
        report = verify_ledger(ledger, trusted, sums=not args.no_sums, record=record)
        if record is not None:
            report.notes.append(f"checked against the signer's record {record_path}")
        return _print(report, args.json, args.ledger)
    if not Path(args.export).is_file():
        raise SystemExit(f"error: no export at {args.export}")
    try:
        report = verify_export_file(args.export, trusted)
    except ReceiptError as e:
        raise SystemExit(f"error: {args.export}: {e}") from None
    return _print(report, args.json, args.export)


def register(sub: Any) -> None:
    r = sub.add_parser("receipts", help="signed receipts: keys, signing, exports for auditors")
    rsub = r.add_subparsers(dest="receipts_command", required=True)
    k = rsub.add_parser("keygen", help="make an Ed25519 signing key (PEM)")
    k.add_argument("path")
    k.set_defaults(func=cmd_keygen)
    pk = rsub.add_parser("public-key", help="the public key of a signing key, to publish")
    pk.add_argument("path")
    pk.set_defaults(func=cmd_public_key)
    s = rsub.add_parser("sign", help="sign every tenant's chain head now")
    s.add_argument("--ledger", required=True)
    s.add_argument("--key", help="default: the ledger's path + .key")
    s.set_defaults(func=cmd_sign)
    e = rsub.add_parser("export", help="a tenant's receipts as signed JSON lines")
    e.add_argument("--ledger", required=True)
    e.add_argument("--tenant", required=True)
    e.add_argument("--month", help="YYYY-MM: the receipts chained in that UTC month")
    e.add_argument("--from", dest="from_", help="ISO date/time, UTC")
    e.add_argument("--to", help="ISO date/time, UTC (exclusive)")
    e.add_argument("--key", help="default: the ledger's path + .key")
    e.add_argument("-o", "--output", default="-", help="default: standard output")
    e.set_defaults(func=cmd_export)

    v = sub.add_parser("verify", help="check an export, or a whole ledger, for any change")
    v.add_argument("export", nargs="?", help="an export of router receipts export")
    v.add_argument("--ledger", help="check this ledger's chains and signed heads instead")
    v.add_argument(
        "--public-key",
        action="append",
        help="a trusted public key (base64, PEM, or a file of either; repeatable); default: "
        "the key the export names, reported as such",
    )
    v.add_argument(
        "--signer-record",
        help="with --ledger: the heads the signer recorded it signed (its key's path + .heads; "
        "default: the ledger's path + .key.heads when there); finds signatures removed from "
        "the ledger",
    )
    v.add_argument(
        "--no-sums",
        action="store_true",
        help="with --ledger: skip checking the kept hourly and daily sums against the rows",
    )
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=cmd_verify)
