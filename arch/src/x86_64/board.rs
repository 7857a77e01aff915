//! The x86_64 board: which device sits at which port-I/O address and IRQ.
//!
//! The VMM places its devices where this module says and describes them to
//! the guest from the same table (the DSDT's ISA devices), so the two can
//! never disagree.

use super::acpi::IsaDevice;

/// A device window on the bus and the GSI it raises, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    /// First bus address (an I/O port on x86).
    pub base: u64,
    /// Bytes of bus address space.
    pub len: u64,
    /// Its interrupt line.
    pub gsi: u32,
}

/// COM1, the guest console (ttyS0).
pub const CONSOLE_UART: Slot = Slot {
    base: 0x3f8,
    len: 8,
    gsi: 4,
};

/// COM2, the guest agent's channel (ttyS1).
pub const AGENT_UART: Slot = Slot {
    base: 0x2f8,
    len: 8,
    gsi: 3,
};

/// The i8042 controller (its CPU-reset command) with system control port B.
pub const I8042: Slot = Slot {
    base: 0x60,
    len: 5,
    gsi: 1,
};

/// The CMOS/RTC index and data ports.
pub const CMOS: Slot = Slot {
    base: 0x70,
    len: 2,
    gsi: 8,
};

/// The GSI of the Generic Event Device that notifies GSIV-signalled GHES
/// error sources (free on a PC: 5 was LPT2).
pub const GHES_GSI: u32 = 5;

/// The ISA devices, as the DSDT describes them.
pub const ISA_DEVICES: [IsaDevice; 4] = [
    IsaDevice {
        name: "COM1",
        hid: "PNP0501",
        uid: 1,
        port: port(CONSOLE_UART.base),
        len: len8(CONSOLE_UART.len),
        irq: Some(CONSOLE_UART.gsi),
    },
    IsaDevice {
        name: "COM2",
        hid: "PNP0501",
        uid: 2,
        port: port(AGENT_UART.base),
        len: len8(AGENT_UART.len),
        irq: Some(AGENT_UART.gsi),
    },
    IsaDevice {
        name: "PS2K",
        hid: "PNP0303",
        uid: 0,
        port: port(I8042.base),
        len: len8(I8042.len),
        irq: None,
    },
    IsaDevice {
        name: "RTC_",
        hid: "PNP0B00",
        uid: 0,
        port: port(CMOS.base),
        len: len8(CMOS.len),
        irq: None,
    },
];

/// A port number from a slot's base (every x86 slot is below 64 KiB,
/// which the assertion checks at compile time).
#[allow(clippy::cast_possible_truncation)]
const fn port(base: u64) -> u16 {
    assert!(base <= u16::MAX as u64);
    base as u16
}

/// A window length as the DSDT's IO descriptor holds it (checked at
/// compile time).
#[allow(clippy::cast_possible_truncation)]
const fn len8(len: u64) -> u8 {
    assert!(len <= u8::MAX as u64);
    len as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dsdt_devices_are_the_placed_devices() {
        assert_eq!(ISA_DEVICES[0].port, 0x3f8);
        assert_eq!(ISA_DEVICES[1].irq, Some(3));
        let mut windows: Vec<(u64, u64)> = [CONSOLE_UART, AGENT_UART, I8042, CMOS]
            .iter()
            .map(|s| (s.base, s.base + s.len))
            .collect();
        windows.sort_unstable();
        assert!(windows.windows(2).all(|w| w[0].1 <= w[1].0), "no overlap");
    }
}
