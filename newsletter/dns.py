"""``newsletter dns``: the SPF, DKIM and DMARC records to publish for the sender's domain.

Gmail and Yahoo require of bulk senders SPF or DKIM that aligns with the From domain,
both set up, and a DMARC record. The records are built from the config alone (no DNS
look-up): SPF names the configured mail server, DKIM is the configured key's public
half, DMARC starts at ``p=none`` with aggregate reports to the sender's domain.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from . import dkim
from .addresses import organisational_domain
from .config import Config
from .transport import is_loopback


@dataclass(frozen=True)
class DnsRecord:
    """One TXT record: where, what, and what to know about it (``value`` "" = none yet)."""

    kind: str  # SPF, DKIM or DMARC
    name: str
    value: str
    notes: tuple[str, ...] = ()

    @property
    def zone_line(self) -> str:
        return dkim.zone_line(self.name, self.value) if self.value else ""


def _spf(config: Config, domain: str) -> DnsRecord:
    host = config.smtp.host
    notes = ["list every server that sends mail From this domain; keep one SPF record"]
    if not host or is_loopback(host, resolve=False):
        mechanism = "mx"
        notes.append(
            f"[smtp] host is {host or 'empty'} (this machine): replace 'mx' with ip4:/ip6: "
            "of the address your mail leaves from, or your provider's include:"
        )
    else:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            mechanism = f"a:{host}"
            notes.append(
                f"a:{host} covers a server that sends itself; a provider's relay wants its "
                "include: instead (see its documentation)"
            )
        else:
            mechanism = f"ip{address.version}:{address}"
    return DnsRecord("SPF", f"{domain}.", f"v=spf1 {mechanism} ~all", tuple(notes))


def _dkim(config: Config, domain: str) -> DnsRecord:
    signer = dkim.signer_from_config(config)
    if signer is None:
        return DnsRecord(
            "DKIM",
            f"SELECTOR._domainkey.{domain}.",
            "",
            (
                "DKIM is off: run `newsletter dkim keygen`, set [dkim] selector, domain and "
                "key_file, then run `newsletter dns` again (or publish your provider's key)",
            ),
        )
    notes = [f"the public half of {dkim.key_path(config)}", *signer.warnings]
    return DnsRecord("DKIM", f"{signer.record_name}.", signer.record_value, tuple(notes))


def _dmarc(domain: str) -> DnsRecord:
    org = organisational_domain(domain)
    notes = [
        "start with p=none and read the reports; then p=quarantine, then p=reject",
        "relaxed alignment (adkim=r, aspf=r): a DKIM or SPF domain under "
        f"{org} aligns with From {domain}",
    ]
    if org != domain:
        notes.append(f"a record at _dmarc.{org} covers {domain} too, unless this one exists")
    value = f"v=DMARC1; p=none; rua=mailto:dmarc-reports@{domain}; adkim=r; aspf=r"
    return DnsRecord("DMARC", f"_dmarc.{domain}.", value, tuple(notes))


def records(config: Config) -> list[DnsRecord]:
    """SPF, DKIM and DMARC for the From domain; raises ConfigError for a bad DKIM setup."""
    domain = config.sender_domain
    return [_spf(config, domain), _dkim(config, config.dkim.domain or domain), _dmarc(domain)]


__all__ = ["DnsRecord", "records"]
