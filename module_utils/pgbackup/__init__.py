"""pgbackup: encrypted, verified PostgreSQL backups.

The one core behind both faces: the on-host CLI (`python3 -m pgbackup`, installed as
`pgbackup`) and the Ansible modules in library/.
"""

__version__ = "0.2.0"
