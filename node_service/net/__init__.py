"""net area: virtual IPs (vip), gratuitous ARP (garp), namespace entry (netns)."""
