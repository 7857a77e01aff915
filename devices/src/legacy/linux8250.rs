//! A model of the guest side of a UART: Linux 7.3's 8250 driver as it
//! drives a 16550A through port I/O, for tests of the UART model and of the
//! agent port. It makes the driver's register accesses in the driver's
//! order, and takes interrupts as edges the way an edge-triggered ISA IRQ
//! does: edges coalesce into one pending interrupt, and one that arrives
//! while the handler runs makes it run again afterwards.
//!
//! What it follows (drivers/tty/serial/8250/ in linux-source-7.3):
//! `serial8250_interrupt` (8250_core.c:73), which calls the port's handler
//! until it reports no interrupt or 512 passes went by;
//! `serial8250_default_handle_irq` (8250_port.c:1881), which reads IIR;
//! `serial8250_handle_irq` (8250_port.c:1869), which gives up on
//! `UART_IIR_NO_INT` and otherwise reads LSR, receives, reads MSR and
//! transmits; `serial8250_rx_chars` (8250_port.c:1678) with its 256-character
//! limit; `serial8250_tx_chars`, which loads 16 bytes (a 16550A's
//! `tx_loadsz`) and clears IER.THRI when the transmit buffer is empty;
//! `__start_tx` setting IER.THRI; the startup's THRE and TXEN probes; and
//! the IER save/clear/restore around console writes. DMA, RS-485, break and
//! line errors are left out: rasvmm's UARTs raise none of them.

use std::collections::VecDeque;

use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

const UART_RX: u64 = 0;
const UART_TX: u64 = 0;
const UART_IER: u64 = 1;
const UART_IIR: u64 = 2;
const UART_FCR: u64 = 2;
const UART_LCR: u64 = 3;
const UART_MCR: u64 = 4;
const UART_LSR: u64 = 5;
const UART_MSR: u64 = 6;

const UART_IER_RDI: u8 = 0x01;
const UART_IER_THRI: u8 = 0x02;
const UART_IER_RLSI: u8 = 0x04;
const UART_IIR_NO_INT: u8 = 0x01;
const UART_LSR_DR: u8 = 0x01;
const UART_LSR_BI: u8 = 0x10;
const UART_LSR_THRE: u8 = 0x20;
const UART_LSR_TEMT: u8 = 0x40;
/// 8250_core.c: PASS_LIMIT.
const PASS_LIMIT: u32 = 512;
/// 8250_port.c: serial8250_rx_chars's max_count.
const RX_MAX_COUNT: u32 = 256;
/// uart_config[PORT_16550A].tx_loadsz.
const TX_LOADSZ: usize = 16;

/// The driver's state for one port.
#[derive(Debug, Default)]
pub struct Linux8250 {
    /// The driver's copy of IER (`up->ier`).
    pub ier: u8,
    /// Characters the driver received (what it pushed to the tty layer).
    pub received: Vec<u8>,
    /// The tty's transmit buffer (`xmit_fifo`).
    pub xmit: VecDeque<u8>,
    /// Times the interrupt handler ran.
    pub interrupts: u64,
    /// Handler runs that found no interrupt (IRQ_NONE).
    pub spurious: u64,
    /// Handler runs that stopped at PASS_LIMIT ("too much work for irq").
    pub pass_limit_hits: u64,
    /// The startup probes found UART_BUG_THRE.
    pub bug_thre: bool,
    /// The startup probes found UART_BUG_TXEN.
    pub bug_txen: bool,
}

fn inb(dev: &mut dyn BusDevice, offset: u64) -> u8 {
    let mut b = [0u8];
    dev.read(offset, &mut b);
    b[0]
}

fn outb(dev: &mut dyn BusDevice, offset: u64, v: u8) {
    dev.write(offset, &[v]);
}

impl Linux8250 {
    /// A driver for a port that is not open yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// `serial8250_do_startup` for a 16550A with an IRQ, in its order: clear
    /// the FIFOs and interrupt registers, the THRE test (under
    /// `disable_irq`: edges wait), 8N1, OUT2|DTR|RTS, the TXEN test, clear
    /// again, then enable the receive interrupts.
    pub fn startup(&mut self, dev: &mut dyn BusDevice) {
        outb(dev, UART_FCR, 0x07);
        outb(dev, UART_FCR, 0x00);
        for r in [UART_LSR, UART_RX, UART_IIR, UART_MSR] {
            inb(dev, r);
        }
        // serial8250_THRE_test
        outb(dev, UART_IER, UART_IER_THRI);
        let noint1 = inb(dev, UART_IIR) & UART_IIR_NO_INT != 0;
        outb(dev, UART_IER, 0);
        outb(dev, UART_IER, UART_IER_THRI);
        let noint2 = inb(dev, UART_IIR) & UART_IIR_NO_INT != 0;
        outb(dev, UART_IER, 0);
        self.bug_thre = !noint1 && noint2;
        outb(dev, UART_LCR, 0x03);
        outb(dev, UART_MCR, 0x0b);
        // serial8250_iir_txen_test
        outb(dev, UART_IER, UART_IER_THRI);
        let temt = inb(dev, UART_LSR) & UART_LSR_TEMT != 0;
        let noint = inb(dev, UART_IIR) & UART_IIR_NO_INT != 0;
        outb(dev, UART_IER, 0);
        self.bug_txen = temt && noint;
        for r in [UART_LSR, UART_RX, UART_IIR, UART_MSR] {
            inb(dev, r);
        }
        self.ier = UART_IER_RLSI | UART_IER_RDI;
        outb(dev, UART_IER, self.ier);
    }

    /// The tty layer hands the driver bytes to send: queue them and
    /// `__start_tx` (set IER.THRI unless it is set).
    pub fn write(&mut self, dev: &mut dyn BusDevice, bytes: &[u8]) {
        self.xmit.extend(bytes);
        if !self.xmit.is_empty() && self.ier & UART_IER_THRI == 0 {
            self.ier |= UART_IER_THRI;
            outb(dev, UART_IER, self.ier);
        }
    }

    /// `serial8250_throttle`'s effect on a plain 8250: stop receive
    /// interrupts (IER.RDI and RLSI off).
    pub fn throttle(&mut self, dev: &mut dyn BusDevice) {
        self.ier &= !(UART_IER_RLSI | UART_IER_RDI);
        outb(dev, UART_IER, self.ier);
    }

    /// Receive interrupts back on (`serial8250_unthrottle`).
    pub fn unthrottle(&mut self, dev: &mut dyn BusDevice) {
        self.ier |= UART_IER_RLSI | UART_IER_RDI;
        outb(dev, UART_IER, self.ier);
    }

    /// A console write on this port (`serial8250_console_write`): IER
    /// cleared, the message polled out, IER restored.
    pub fn console_write(&mut self, dev: &mut dyn BusDevice, msg: &[u8]) {
        outb(dev, UART_IER, 0);
        for &c in msg {
            while inb(dev, UART_LSR) & UART_LSR_THRE == 0 {}
            outb(dev, UART_TX, c);
        }
        while inb(dev, UART_LSR) & (UART_LSR_THRE | UART_LSR_TEMT) != UART_LSR_THRE | UART_LSR_TEMT
        {
        }
        outb(dev, UART_IER, self.ier);
    }

    /// Takes every interrupt pending on `irq`, as the CPU would once the
    /// handler returns: runs the handler while edges are pending. Returns
    /// how many times it ran.
    pub fn serve(&mut self, dev: &mut dyn BusDevice, irq: &EventFd) -> u64 {
        let mut runs = 0;
        // A non-blocking eventfd reads as an error once no edge is pending.
        while irq.read().is_ok() {
            self.interrupt(dev);
            runs += 1;
        }
        runs
    }

    /// `serial8250_interrupt` for an IRQ with this one port: run the port's
    /// handler until it finds no interrupt. Returns whether it handled one.
    pub fn interrupt(&mut self, dev: &mut dyn BusDevice) -> bool {
        self.interrupts += 1;
        let mut handled = false;
        let mut passes = 0;
        while self.handle_irq(dev) {
            handled = true;
            passes += 1;
            if passes > PASS_LIMIT {
                self.pass_limit_hits += 1;
                break;
            }
        }
        if !handled {
            self.spurious += 1;
        }
        handled
    }

    /// `serial8250_default_handle_irq` and `serial8250_handle_irq`.
    fn handle_irq(&mut self, dev: &mut dyn BusDevice) -> bool {
        let iir = inb(dev, UART_IIR);
        if iir & UART_IIR_NO_INT != 0 {
            return false;
        }
        let mut status = inb(dev, UART_LSR);
        if status & (UART_LSR_DR | UART_LSR_BI) != 0 {
            status = self.rx_chars(dev, status);
        }
        inb(dev, UART_MSR);
        if status & UART_LSR_THRE != 0 && self.ier & UART_IER_THRI != 0 {
            self.tx_chars(dev);
        }
        true
    }

    /// `serial8250_rx_chars`: at most 256 characters per call.
    fn rx_chars(&mut self, dev: &mut dyn BusDevice, mut lsr: u8) -> u8 {
        let mut max_count = RX_MAX_COUNT;
        loop {
            let ch = if lsr & UART_LSR_DR != 0 {
                inb(dev, UART_RX)
            } else {
                0
            };
            self.received.push(ch);
            max_count -= 1;
            if max_count == 0 {
                break;
            }
            lsr = inb(dev, UART_LSR);
            if lsr & (UART_LSR_DR | UART_LSR_BI) == 0 {
                break;
            }
        }
        lsr
    }

    /// `serial8250_tx_chars`, then `__stop_tx` once the buffer is empty.
    fn tx_chars(&mut self, dev: &mut dyn BusDevice) {
        if self.xmit.is_empty() {
            self.stop_tx(dev);
            return;
        }
        for _ in 0..TX_LOADSZ {
            match self.xmit.pop_front() {
                Some(c) => outb(dev, UART_TX, c),
                None => break,
            }
        }
        if self.xmit.is_empty() {
            self.stop_tx(dev);
        }
    }

    fn stop_tx(&mut self, dev: &mut dyn BusDevice) {
        if self.ier & UART_IER_THRI != 0 {
            self.ier &= !UART_IER_THRI;
            outb(dev, UART_IER, self.ier);
        }
    }
}
