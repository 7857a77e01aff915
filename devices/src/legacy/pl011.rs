//! ARM PrimeCell PL011 UART (rasvmm's own model), on the MMIO bus: arm64
//! guests' console (ttyAMA0) and agent channel (ttyAMA1).
//!
//! # What is modelled
//!
//! The registers Linux's amba-pl011 driver (drivers/tty/serial/amba-pl011.c
//! in 7.3) and its earlycon use, at the offsets of the PL011 TRM (ARM DDI
//! 0183G, 3.2): DR, RSR/ECR, FR, ILPR, IBRD, FBRD, LCR_H, CR, IFLS, IMSC,
//! RIS, MIS, ICR, DMACR and the PrimeCell identification registers. The
//! peripheral ID reads 0x00141011 (part 0x011, designer ARM, revision 1),
//! which the driver matches as `vendor_arm` with a 16-entry FIFO
//! (`get_fifosize_arm`: revision < 3); the PrimeCell ID is 0xb105f00d. The
//! same values as QEMU's hw/char/pl011.c.
//!
//! - Transmit: a byte written to DR goes to the output sink at once, so the
//!   transmit FIFO is always empty: FR.TXFE set, TXFF and BUSY clear, and
//!   the transmit interrupt condition (TXIS: FIFO at or below its trigger
//!   level) always holds. Linux unmasks TXIM only while it has bytes to
//!   send (pl011_start_tx_pio; pl011_stop_tx masks it), so this raises an
//!   interrupt exactly when the driver waits for room.
//! - Receive: a 16-byte FIFO the VMM fills ([`Pl011::enqueue`]). RXIS holds
//!   while a byte waits (a trigger level of one, as QEMU's `read_trigger`
//!   of 1); the receive timeout (RTIS) is not needed with that and never
//!   set. RXIS is thus a function of the FIFO, not a latch: an ICR write
//!   cannot clear it while data waits, and reading the last byte does.
//!   No receive errors, breaks or overruns arise (bytes the FIFO cannot
//!   take stay with the VMM).
//! - Modem lines: CTS, DSR and DCD read as asserted (FR bits 0-2), so a
//!   port opened without CLOCAL does not wait for carrier; they never
//!   change, so no modem-status interrupt arises. CR.LBE loops transmitted
//!   bytes back into the receive FIFO.
//! - Baud rate, line control, FIFO levels and DMA control are stored and
//!   read back, and otherwise ignored (no DMA engine exists).
//!
//! # The interrupt line: a level, delivered as edges
//!
//! The PL011's UARTINTR is a level: `(RIS & IMSC) != 0`. rasvmm delivers it
//! through an eventfd registered as a KVM irqfd (an edge on a GIC SPI the
//! tables declare edge-rising), so after every guest access and every
//! [`Pl011::enqueue`] the level is recomputed and the eventfd signalled on
//! each low-to-high transition, as [`super::SerialPort`] does for the
//! 16550A. Linux's handler (pl011_int) loops while `RIS & im` is non-zero,
//! for up to 257 passes of up to 256 received bytes each, so the line is
//! low when it returns unless more than 65,792 bytes arrive within one
//! interrupt (the agent protocol's longest line is 65,537 bytes).

use std::io::Write;

use vmm_sys_util::eventfd::EventFd;

use super::uart::UartCore;
use super::Uart;
use crate::bus::BusDevice;

/// The receive FIFO's depth (the PL011 revision Linux sees has 16).
pub const FIFO_SIZE: usize = 16;

// Register offsets (PL011 TRM table 3-1).
const DR: u64 = 0x000;
const RSR: u64 = 0x004;
const FR: u64 = 0x018;
const ILPR: u64 = 0x020;
const IBRD: u64 = 0x024;
const FBRD: u64 = 0x028;
const LCR_H: u64 = 0x02c;
const CR: u64 = 0x030;
const IFLS: u64 = 0x034;
const IMSC: u64 = 0x038;
const RIS: u64 = 0x03c;
const MIS: u64 = 0x040;
const ICR: u64 = 0x044;
const DMACR: u64 = 0x048;
/// First identification register (UARTPeriphID0); eight follow, 4 apart.
const ID_START: u64 = 0xfe0;

/// UARTPeriphID0-3 then UARTPCellID0-3.
const IDS: [u8; 8] = [0x11, 0x10, 0x14, 0x00, 0x0d, 0xf0, 0x05, 0xb1];

const FR_CTS: u32 = 1 << 0;
const FR_DSR: u32 = 1 << 1;
const FR_DCD: u32 = 1 << 2;
const FR_RXFE: u32 = 1 << 4;
const FR_RXFF: u32 = 1 << 6;
const FR_TXFE: u32 = 1 << 7;

/// Interrupt bits (RIS, MIS, IMSC, ICR): receive.
const INT_RX: u32 = 1 << 4;
/// Transmit interrupt.
const INT_TX: u32 = 1 << 5;
/// Receive timeout interrupt (Linux enables it; never raised here).
#[cfg_attr(not(test), allow(dead_code))]
const INT_RT: u32 = 1 << 6;
/// The 11 interrupt bits.
const INT_ALL: u32 = 0x7ff;

/// CR: loopback enable.
const CR_LBE: u32 = 1 << 7;
/// CR reset value: TXE | RXE.
const CR_RESET: u32 = 0x300;
/// IFLS reset value: both FIFOs at half.
const IFLS_RESET: u32 = 0x12;

/// A PL011 whose transmitted bytes go to `W` and whose interrupt line is
/// delivered as an edge on every low-to-high transition (module docs).
pub struct Pl011<W: Write + Send> {
    ilpr: u32,
    ibrd: u32,
    fbrd: u32,
    lcr_h: u32,
    cr: u32,
    ifls: u32,
    imsc: u32,
    dmacr: u32,
    core: UartCore<W>,
}

impl<W: Write + Send> Pl011<W> {
    /// A UART raising its interrupt through `irq` and writing output to `out`.
    pub fn new(irq: EventFd, out: W) -> Self {
        Self {
            ilpr: 0,
            ibrd: 0,
            fbrd: 0,
            lcr_h: 0,
            cr: CR_RESET,
            ifls: IFLS_RESET,
            imsc: 0,
            dmacr: 0,
            core: UartCore::new(irq, out, FIFO_SIZE),
        }
    }

    /// The raw interrupt status: a function of the FIFOs (module docs).
    fn ris(&self) -> u32 {
        let rx = if self.core.rx_waiting() { INT_RX } else { 0 };
        rx | INT_TX
    }

    fn fr(&self) -> u32 {
        let mut fr = FR_TXFE | FR_CTS | FR_DSR | FR_DCD;
        if !self.core.rx_waiting() {
            fr |= FR_RXFE;
        }
        if self.core.rx_full() {
            fr |= FR_RXFF;
        }
        fr
    }

    /// Recomputes the interrupt line and raises an edge if it went high.
    fn update_irq(&mut self) {
        let level = self.ris() & self.imsc != 0;
        self.core.set_line(level);
    }

    fn read_reg(&mut self, offset: u64) -> u32 {
        match offset {
            DR => self.core.read_byte().map_or(0, u32::from),
            RSR => 0,
            FR => self.fr(),
            ILPR => self.ilpr,
            IBRD => self.ibrd,
            FBRD => self.fbrd,
            LCR_H => self.lcr_h,
            CR => self.cr,
            IFLS => self.ifls,
            IMSC => self.imsc,
            RIS => self.ris(),
            MIS => self.ris() & self.imsc,
            DMACR => self.dmacr,
            o if (ID_START..ID_START + 4 * IDS.len() as u64).contains(&o) && o % 4 == 0 => {
                usize::try_from((o - ID_START) / 4)
                    .ok()
                    .and_then(|i| IDS.get(i))
                    .map_or(0, |b| u32::from(*b))
            }
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        match offset {
            DR => {
                let byte = v.to_le_bytes()[0];
                if self.cr & CR_LBE != 0 {
                    self.core.loop_back(byte);
                } else {
                    self.core.transmit(byte);
                }
            }
            // ECR: clears receive errors, of which there are none.
            RSR => {}
            ILPR => self.ilpr = v & 0xff,
            IBRD => self.ibrd = v & 0xffff,
            FBRD => self.fbrd = v & 0x3f,
            LCR_H => self.lcr_h = v & 0xff,
            CR => self.cr = v & 0xffff,
            IFLS => self.ifls = v & 0x3f,
            IMSC => self.imsc = v & INT_ALL,
            // ICR: every condition here is a level of the FIFOs' state, so
            // there is no latched status to clear.
            ICR => {}
            DMACR => self.dmacr = v & 0x7,
            _ => {}
        }
    }
}

/// The value of a little-endian access of up to four bytes.
fn access_value(data: &[u8]) -> u32 {
    let mut b = [0u8; 4];
    let n = data.len().min(4);
    b[..n].copy_from_slice(&data[..n]);
    u32::from_le_bytes(b)
}

impl<W: Write + Send> BusDevice for Pl011<W> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // Registers are 32 bits wide (Linux uses 32-bit or 16-bit
        // accesses; earlycon "pl011,mmio32" 32-bit): a narrower access
        // reads the low bytes, a wider one zero-extends.
        let v = self.read_reg(offset).to_le_bytes();
        self.update_irq();
        data.fill(0);
        let n = data.len().min(4);
        data[..n].copy_from_slice(&v[..n]);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        self.write_reg(offset, access_value(data));
        self.update_irq();
    }
}

impl<W: Write + Send> Uart<W> for Pl011<W> {
    fn new(irq: EventFd, out: W) -> Self {
        Pl011::new(irq, out)
    }
    /// None in loopback, where the receiver is cut off from the line.
    fn enqueue(&mut self, bytes: &[u8]) -> usize {
        if self.cr & CR_LBE != 0 {
            return 0;
        }
        let n = self.core.receive(bytes);
        self.update_irq();
        n
    }
    fn rx_waiting(&self) -> bool {
        self.core.rx_waiting()
    }
    /// Asserted when `MIS != 0`.
    fn irq_asserted(&self) -> bool {
        self.core.line()
    }
    fn writer_mut(&mut self) -> &mut W {
        self.core.out_mut()
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use std::collections::VecDeque;

    use super::*;

    fn eventfd() -> EventFd {
        // EFD_NONBLOCK
        EventFd::new(0o4000).unwrap()
    }

    fn rd(u: &mut impl BusDevice, off: u64) -> u32 {
        let mut b = [0u8; 4];
        u.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn wr(u: &mut impl BusDevice, off: u64, v: u32) {
        u.write(off, &v.to_le_bytes());
    }

    /// What Linux 7.3's amba-pl011 driver does, in the order it does it,
    /// with its interrupt handler (pl011_int) run on every edge.
    struct LinuxPl011 {
        im: u32,
        xmit: VecDeque<u8>,
        received: Vec<u8>,
        pass_limit_hits: usize,
        fifosize: usize,
    }

    impl LinuxPl011 {
        /// amba probe (periphid), pl011_hwinit, pl011_startup,
        /// pl011_enable_interrupts.
        fn startup(port: &mut impl BusDevice) -> Self {
            let id = (0..4).fold(0u32, |a, i| a | (rd(port, 0xfe0 + 4 * i) & 0xff) << (8 * i));
            let cid = (0..4).fold(0u32, |a, i| a | (rd(port, 0xff0 + 4 * i) & 0xff) << (8 * i));
            assert_eq!(cid, 0xb105_f00d, "AMBA_CID");
            // amba_pl011 id table: 0x00041011 under mask 0x000fffff.
            assert_eq!(id & 0x000f_ffff, 0x0004_1011);
            // get_fifosize_arm: revision (bits 23:20) < 3 -> 16.
            let fifosize = if (id >> 20) & 0xf < 3 { 16 } else { 32 };
            wr(port, ICR, 0x7c0 | INT_RT | INT_RX);
            let _saved = rd(port, IMSC);
            wr(port, IMSC, INT_RT | INT_RX);
            wr(port, IFLS, 0x12);
            let cr = rd(port, CR) & (0x800 | 0x400);
            wr(port, CR, cr | 0x301);
            let _modem = rd(port, FR) & 0x1ff;
            // pl011_enable_interrupts.
            wr(port, ICR, INT_RT | INT_RX);
            for _ in 0..fifosize * 2 {
                if rd(port, FR) & FR_RXFE != 0 {
                    break;
                }
                rd(port, DR);
            }
            let im = INT_RT | INT_RX;
            wr(port, IMSC, im);
            Self {
                im,
                xmit: VecDeque::new(),
                received: Vec::new(),
                pass_limit_hits: 0,
                fifosize,
            }
        }

        /// pl011_fifo_to_tty: up to 256 bytes while RXFE is clear.
        fn rx_chars(&mut self, port: &mut impl BusDevice) {
            for _ in 0..256 {
                if rd(port, FR) & FR_RXFE != 0 {
                    break;
                }
                self.received.push(rd(port, DR).to_le_bytes()[0]);
            }
        }

        fn stop_tx(&mut self, port: &mut impl BusDevice) {
            self.im &= !INT_TX;
            wr(port, IMSC, self.im);
        }

        /// pl011_tx_chars.
        fn tx_chars(&mut self, port: &mut impl BusDevice, from_irq: bool) -> bool {
            let mut count = self.fifosize >> 1;
            if self.xmit.is_empty() {
                self.stop_tx(port);
                return false;
            }
            loop {
                if from_irq {
                    if count == 0 {
                        break;
                    }
                    count -= 1;
                }
                let Some(&c) = self.xmit.front() else { break };
                if !from_irq && rd(port, FR) & (1 << 5) != 0 {
                    break;
                }
                wr(port, DR, u32::from(c));
                self.xmit.pop_front();
            }
            if self.xmit.is_empty() {
                self.stop_tx(port);
                return false;
            }
            true
        }

        /// uart_write -> pl011_start_tx -> pl011_start_tx_pio.
        fn write(&mut self, port: &mut impl BusDevice, bytes: &[u8]) {
            self.xmit.extend(bytes);
            if self.tx_chars(port, false) {
                self.im |= INT_TX;
                wr(port, IMSC, self.im);
            }
        }

        /// pl011_int.
        fn interrupt(&mut self, port: &mut impl BusDevice) {
            let mut pass_counter = 256u32;
            let mut status = rd(port, RIS) & self.im;
            while status != 0 {
                wr(port, ICR, status & !(INT_TX | INT_RT | INT_RX));
                if status & (INT_RT | INT_RX) != 0 {
                    self.rx_chars(port);
                }
                if status & INT_TX != 0 {
                    self.tx_chars(port, true);
                }
                if pass_counter == 0 {
                    // Linux leaves with the line still high only if a
                    // condition remains: with edge delivery, a stall.
                    if rd(port, RIS) & self.im != 0 {
                        self.pass_limit_hits += 1;
                    }
                    break;
                }
                pass_counter -= 1;
                status = rd(port, RIS) & self.im;
            }
        }

        /// Runs the handler for every edge until none is pending.
        fn serve(&mut self, port: &mut impl BusDevice, irq: &EventFd) {
            while irq.read().is_ok() {
                self.interrupt(port);
            }
        }
    }

    /// The agent port's feeding: bytes wait in a queue and the FIFO is
    /// refilled after every guest read.
    struct Refill {
        uart: Pl011<Vec<u8>>,
        pending: VecDeque<u8>,
    }

    impl Refill {
        fn send(&mut self, bytes: &[u8]) {
            self.pending.extend(bytes);
            self.pump();
        }
        fn pump(&mut self) {
            let n = self.uart.enqueue(self.pending.make_contiguous());
            self.pending.drain(..n);
        }
    }

    impl BusDevice for Refill {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            self.uart.read(offset, data);
            self.pump();
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.uart.write(offset, data);
        }
    }

    #[test]
    fn identification_and_reset_values() {
        let mut u = Pl011::new(eventfd(), Vec::new());
        let ids: Vec<u32> = (0..8).map(|i| rd(&mut u, 0xfe0 + 4 * i)).collect();
        assert_eq!(ids, vec![0x11, 0x10, 0x14, 0x00, 0x0d, 0xf0, 0x05, 0xb1]);
        assert_eq!(rd(&mut u, FR) & (FR_RXFE | FR_TXFE), FR_RXFE | FR_TXFE);
        assert_eq!(rd(&mut u, CR), 0x300);
        assert_eq!(rd(&mut u, IFLS), 0x12);
        assert_eq!(rd(&mut u, IMSC), 0);
        assert_eq!(rd(&mut u, 0xfe2), 0, "unaligned ID access");
        // A 16-bit access reads the low half.
        let mut b = [0u8; 2];
        u.read(0xfe0, &mut b);
        assert_eq!(b, [0x11, 0]);
    }

    #[test]
    fn linux_startup_finds_a_quiet_port() {
        let irq = eventfd();
        let mut u = Pl011::new(irq.try_clone().unwrap(), Vec::new());
        let mut guest = LinuxPl011::startup(&mut u);
        assert_eq!(guest.fifosize, 16);
        assert_eq!(rd(&mut u, CR), 0x301);
        guest.serve(&mut u, &irq);
        assert!(!u.irq_asserted());
        assert_eq!(rd(&mut u, MIS), 0);
    }

    #[test]
    fn receive_interrupt_follows_the_fifo() {
        let irq = eventfd();
        let mut u = Pl011::new(irq.try_clone().unwrap(), Vec::new());
        wr(&mut u, IMSC, INT_RX | INT_RT);
        assert_eq!(u.enqueue(b"ab"), 2);
        assert_eq!(irq.read().unwrap(), 1, "one edge");
        assert_eq!(rd(&mut u, MIS), INT_RX);
        // ICR cannot clear it while data waits.
        wr(&mut u, ICR, INT_ALL);
        assert_eq!(rd(&mut u, MIS), INT_RX);
        assert_eq!(rd(&mut u, DR), u32::from(b'a'));
        assert!(u.irq_asserted());
        assert_eq!(rd(&mut u, DR), u32::from(b'b'));
        assert!(!u.irq_asserted());
        assert_eq!(rd(&mut u, FR) & FR_RXFE, FR_RXFE);
        assert!(irq.read().is_err(), "no edge while it fell");
        u.enqueue(b"c");
        assert_eq!(irq.read().unwrap(), 1, "low to high: an edge");
    }

    #[test]
    fn fifo_is_bounded_and_reports_full() {
        let mut u = Pl011::new(eventfd(), Vec::new());
        assert_eq!(u.enqueue(&[b'x'; 100]), FIFO_SIZE);
        assert_eq!(u.enqueue(b"y"), 0);
        assert_eq!(rd(&mut u, FR) & FR_RXFF, FR_RXFF);
        assert!(u.rx_waiting());
    }

    #[test]
    fn masked_data_raises_an_edge_when_unmasked() {
        // Throttling masks RXIM; unthrottling with data waiting must raise
        // the line at once.
        let irq = eventfd();
        let mut u = Pl011::new(irq.try_clone().unwrap(), Vec::new());
        u.enqueue(b"q");
        assert!(irq.read().is_err());
        wr(&mut u, IMSC, INT_RX);
        assert_eq!(irq.read().unwrap(), 1);
    }

    #[test]
    fn transmit_goes_out_at_once_and_txim_interrupts() {
        let irq = eventfd();
        let mut u = Pl011::new(irq.try_clone().unwrap(), Vec::new());
        wr(&mut u, DR, u32::from(b'h'));
        u.write(DR, b"i");
        assert_eq!(u.writer_mut().as_slice(), b"hi");
        assert_eq!(rd(&mut u, RIS) & INT_TX, INT_TX, "TX FIFO empty");
        assert!(irq.read().is_err(), "masked");
        wr(&mut u, IMSC, INT_TX);
        assert_eq!(irq.read().unwrap(), 1);
        wr(&mut u, IMSC, 0);
        assert!(!u.irq_asserted());
    }

    #[test]
    fn loopback_returns_transmitted_bytes() {
        let mut u = Pl011::new(eventfd(), Vec::new());
        wr(&mut u, CR, 0x381);
        wr(&mut u, DR, u32::from(b'L'));
        assert!(u.writer_mut().is_empty());
        assert_eq!(u.enqueue(b"z"), 0, "receiver cut off");
        assert_eq!(rd(&mut u, DR), u32::from(b'L'));
    }

    #[test]
    fn linux_driver_writes_and_reads_through_interrupts() {
        let irq = eventfd();
        let mut port = Refill {
            uart: Pl011::new(irq.try_clone().unwrap(), Vec::new()),
            pending: VecDeque::new(),
        };
        let mut guest = LinuxPl011::startup(&mut port);
        guest.serve(&mut port, &irq);
        let out: Vec<u8> = (0..=250u8).cycle().take(5000).collect();
        guest.write(&mut port, &out);
        assert_eq!(port.uart.writer_mut().as_slice(), out.as_slice());
        assert_eq!(guest.im & INT_TX, 0, "stop_tx masked TXIM");
        let inp: Vec<u8> = (0..=240u8).cycle().take(5000).collect();
        port.send(&inp);
        guest.serve(&mut port, &irq);
        assert_eq!(guest.received, inp);
        assert!(!port.uart.irq_asserted());
    }

    /// Every line length up to 600 bytes and the agent protocol's longest
    /// line (65,537 bytes) arrive whole within the handler's pass limit.
    #[test]
    fn lines_of_every_length_reach_the_pl011_driver_whole() {
        for len in (1..=600).chain([65_537]) {
            let irq = eventfd();
            let mut port = Refill {
                uart: Pl011::new(irq.try_clone().unwrap(), Vec::new()),
                pending: VecDeque::new(),
            };
            let mut guest = LinuxPl011::startup(&mut port);
            guest.serve(&mut port, &irq);
            let line: Vec<u8> = (b'a'..=b'z').cycle().take(len).collect();
            port.send(&line);
            guest.serve(&mut port, &irq);
            assert_eq!(guest.received.len(), len, "length {len}");
            assert_eq!(guest.received, line);
            assert_eq!(guest.pass_limit_hits, 0);
            assert!(port.pending.is_empty() && !port.uart.rx_waiting());
        }
    }

    #[test]
    fn the_uart_trait_drives_both_uarts() {
        fn exercise<U: Uart<Vec<u8>>>() {
            let irq = eventfd();
            let mut u = U::new(irq.try_clone().unwrap(), Vec::new());
            assert!(!u.rx_waiting());
            assert_eq!(u.enqueue(b"x"), 1);
            assert!(u.rx_waiting());
            assert!(!u.irq_asserted(), "receive interrupt not enabled");
            assert!(u.writer_mut().is_empty());
        }
        exercise::<Pl011<Vec<u8>>>();
        exercise::<super::super::SerialPort<Vec<u8>>>();
    }
}
