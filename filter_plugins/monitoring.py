"""Filters that turn the inventory into Prometheus's scrape targets."""

from __future__ import annotations

from ansible.errors import AnsibleFilterError

DATABASE_GROUPS = ("postgresql", "patroni")
REPLICATION_GROUPS = ("postgresql_primary", "postgresql_standby")


def monitoring_targets(groups: dict, hostvars) -> list[dict]:
    """Every database host of the inventory (groups postgresql and patroni), sorted, with
    the cluster it belongs to and whether Patroni runs it. The cluster is the host's
    `monitoring_cluster` if set; otherwise a Patroni member's is `patroni_scope` (or
    "patroni"), a primary's and its standbys' the primary's name, a single server's its
    own. Alerts about backups look at a whole cluster, so after a failover the new
    leader's backups count."""
    hosts = sorted({host for group in DATABASE_GROUPS for host in groups.get(group, [])})
    patroni = set(groups.get("patroni", []))
    replicated = {host for group in REPLICATION_GROUPS for host in groups.get(group, [])}
    primaries = list(groups.get("postgresql_primary", []))
    targets = []
    for host in hosts:
        variables = hostvars[host]
        if variables.get("monitoring_cluster"):
            cluster = str(variables["monitoring_cluster"])
        elif host in patroni:
            cluster = str(variables.get("patroni_scope") or "patroni")
        elif host in replicated:
            if len(primaries) != 1:
                raise AnsibleFilterError(
                    f"monitoring_targets: {host} needs monitoring_cluster: postgresql_primary holds "
                    f"{primaries}, not one host that names its cluster"
                )
            cluster = primaries[0]
        else:
            cluster = host
        targets.append(
            {
                "host": host,
                "cluster": cluster,
                "patroni": host in patroni,
                "node_exporter_port": int(variables.get("monitoring_node_exporter_port", 9100)),
                "postgres_exporter_port": int(variables.get("monitoring_postgres_exporter_port", 9187)),
                "patroni_port": int(variables.get("patroni_restapi_port", 8008)),
            }
        )
    return targets


class FilterModule:
    def filters(self):
        return {"monitoring_targets": monitoring_targets}
