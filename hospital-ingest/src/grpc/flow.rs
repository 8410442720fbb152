//! Sans-IO subscription flow: where one subscriber stands in the log and what the shell must
//! read or send next.
//!
//! A subscription starts after a cursor (clamped to the head) or live (at the head). It gets
//! the matching stream descriptors, the stored backlog up to the head it saw when it started, a
//! sync marker, then live records from the bus. Live records it already had are skipped; a hole
//! in the live feed (records committed but not seen live) is healed from the store; a
//! subscriber that fell behind the live buffer is told so and catches up from the store. Every
//! message carries the cursor to resume from, so the client never sees a gap or a duplicate.

use relay_proto::model::{
    LaggedNotice, SubscribeResponse, SyncMarker, subscribe_request::Start,
    subscribe_response::Record,
};

/// What to do with a record from the live bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LiveStep {
    /// Already sent (from the backlog or before): nothing to do.
    Skip,
    /// Send it (if the filter matches), after sending the stored records in `heal`
    /// (`(after, up_to]`) that the live feed skipped.
    Deliver {
        /// A hole to fill from the store first.
        heal: Option<(u64, u64)>,
    },
}

/// Position and phase of one subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriptionFlow {
    cursor: u64,
    head: u64,
    synced: bool,
}

impl SubscriptionFlow {
    /// A subscription asking for `start`, with the log's head at `head` (read after joining
    /// the live bus, so whatever is committed later arrives live).
    pub fn new(start: Option<&Start>, head: u64) -> Self {
        let cursor = match start {
            Some(Start::AfterCursor(c)) => (*c).min(head),
            // Resolved to a cursor by the caller (the store knows where that time lies); from
            // the oldest record otherwise, the time filter leaves out what is too old.
            Some(Start::FromCaptureTimeNs(_)) => 0,
            Some(Start::Live(_)) | None => head,
        };
        Self {
            cursor,
            head,
            synced: false,
        }
    }

    /// The cursor of the last record sent (or skipped as not matching): the resume point.
    pub fn cursor(&self) -> u64 {
        self.cursor
    }

    /// The backlog to read from the store, `(after, up_to]`, before the sync marker.
    pub fn backlog(&self) -> (u64, u64) {
        (self.cursor, self.head)
    }

    /// Stored records up to `reached` were examined (sent when they matched).
    pub fn handle_caught_up(&mut self, reached: u64) {
        self.cursor = self.cursor.max(reached);
    }

    /// The backlog is done: the marker that says so, with how many records it held.
    pub fn sync_marker(&mut self, backlog_records: u64) -> SubscribeResponse {
        self.cursor = self.cursor.max(self.head);
        self.synced = true;
        SubscribeResponse {
            cursor: self.cursor,
            record: Some(Record::Sync(SyncMarker { backlog_records })),
            ..Default::default()
        }
    }

    /// Whether the sync marker was sent.
    pub fn is_synced(&self) -> bool {
        self.synced
    }

    /// A record with `cursor` arrived on the live bus.
    pub fn handle_live(&mut self, cursor: u64) -> LiveStep {
        if cursor <= self.cursor {
            return LiveStep::Skip;
        }
        let heal = (cursor > self.cursor + 1).then_some((self.cursor, cursor - 1));
        self.cursor = cursor;
        LiveStep::Deliver { heal }
    }

    /// The subscriber fell `missed` records behind the live buffer: the notice to send; then
    /// the shell reads the store from [`SubscriptionFlow::cursor`] to the head and reports
    /// [`SubscriptionFlow::handle_caught_up`].
    pub fn handle_lagged(&mut self, missed: u64) -> SubscribeResponse {
        SubscribeResponse {
            cursor: self.cursor,
            record: Some(Record::Lagged(LaggedNotice {
                missed_live_records: missed,
            })),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_after_a_cursor_clamped_to_the_head_or_live_at_the_head() {
        let f = SubscriptionFlow::new(Some(&Start::AfterCursor(5)), 10);
        assert_eq!((f.cursor(), f.backlog()), (5, (5, 10)));
        let f = SubscriptionFlow::new(Some(&Start::AfterCursor(50)), 10);
        assert_eq!(f.backlog(), (10, 10), "a cursor from the future means now");
        let f = SubscriptionFlow::new(None, 10);
        assert_eq!(f.backlog(), (10, 10));
    }

    #[test]
    fn backlog_then_sync_then_live_without_gap_or_duplicate() {
        let mut f = SubscriptionFlow::new(Some(&Start::AfterCursor(0)), 3);
        // Records 2 and 3 were committed while joining: they come from the store and again
        // on the bus.
        f.handle_caught_up(3);
        let sync = f.sync_marker(3);
        assert_eq!(sync.cursor, 3);
        assert!(f.is_synced());
        assert_eq!(f.handle_live(2), LiveStep::Skip);
        assert_eq!(f.handle_live(3), LiveStep::Skip);
        assert_eq!(f.handle_live(4), LiveStep::Deliver { heal: None });
        // 5 and 6 never came live: heal them from the store before 7.
        assert_eq!(f.handle_live(7), LiveStep::Deliver { heal: Some((4, 6)) });
        assert_eq!(f.cursor(), 7);
    }

    #[test]
    fn a_lagging_subscriber_is_told_at_its_cursor_and_resumes_from_the_store() {
        let mut f = SubscriptionFlow::new(None, 100);
        f.sync_marker(0);
        let notice = f.handle_lagged(40);
        assert_eq!(notice.cursor, 100);
        assert_eq!(
            notice.record,
            Some(Record::Lagged(LaggedNotice {
                missed_live_records: 40
            }))
        );
        f.handle_caught_up(160);
        assert_eq!(f.handle_live(150), LiveStep::Skip);
        assert_eq!(f.handle_live(161), LiveStep::Deliver { heal: None });
    }
}
