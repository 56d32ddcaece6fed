//! Reads a fuzz input as a stream of choices.

/// A fuzz input read front to back as choices. Past its end every read gives zero, so any byte
/// string is a complete script and a mutation that cuts it short still parses.
pub(super) struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Input<'a> {
        Input { data }
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    pub fn u8(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.u8(), self.u8()])
    }

    pub fn bool(&mut self) -> bool {
        self.u8() & 1 == 1
    }

    /// True about once in `n` reads; false past the end, so a short input is not full of
    /// the rare choices.
    pub fn one_in(&mut self, n: u8) -> bool {
        self.u8() % n == n - 1
    }

    /// A number below `n` (at most 256).
    pub fn below(&mut self, n: usize) -> usize {
        debug_assert!(n > 0 && n <= 256);
        self.u8() as usize % n
    }

    pub fn pick<T: Clone>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())].clone()
    }

    /// Up to `max` bytes (at most 255), taken as they are.
    pub fn bytes(&mut self, max: usize) -> &'a [u8] {
        let n = self.below(max.min(255) + 1).min(self.data.len());
        let (taken, rest) = self.data.split_at(n);
        self.data = rest;
        taken
    }
}

#[cfg(test)]
mod tests {
    use super::Input;

    #[test]
    fn reads_zero_past_the_end() {
        let mut i = Input::new(&[7, 1, 2]);
        assert_eq!(i.u8(), 7);
        assert_eq!(i.u16(), 0x0102);
        assert!(i.is_empty());
        assert_eq!(
            (i.u8(), i.bool(), i.below(3), i.one_in(2)),
            (0, false, 0, false)
        );
        assert!(i.bytes(8).is_empty());
    }

    #[test]
    fn bytes_are_bounded_by_what_is_left() {
        let mut i = Input::new(&[200, 1, 2, 3]);
        assert_eq!(i.bytes(255), &[1, 2, 3]);
    }
}
