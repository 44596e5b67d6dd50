"""The lab on Xen's calling convention: no Xen hypervisor can run on these machines, so
stand-ins do what libxl, xenstored and netback do, in their order, around Debian's real
hotplug scripts (unpacked from the Debian package, never installed: it pulls systemd)."""
