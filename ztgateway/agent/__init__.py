"""The device agent: collects this device's posture and reports it to the gateway over mTLS.

It runs on the devices, not on the gateway host (`ztgateway agent report`, or the standalone
`ztgateway-agent report`), usually from a systemd timer (deploy/systemd/ztgateway-agent.*).
Linux is read from the system itself (block devices, the packet filter, the desktop's lock
setting, the package manager's logs); macOS and Windows through their documented system
commands. Every value carries `evidence`: what the agent saw, so an operator can tell why a
device failed a check without logging in to it. See docs/devices.md.
"""
