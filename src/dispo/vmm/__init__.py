"""VMM backends behind one interface (base.Vmm): QEMU (microvm) and Firecracker."""
