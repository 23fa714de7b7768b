//! Events, written once for both controllers: one per meaningful transition, never failing
//! the reconcile that records it.

use kube::Resource;
use kube::runtime::events::{Event, EventType, Recorder};
use tracing::warn;

/// One Event to record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Note {
    pub type_: EventType,
    pub reason: String,
    pub action: String,
    pub note: String,
}

impl Note {
    /// A Warning with `reason`, recorded for `action`.
    pub fn warning(reason: &str, action: &str, note: impl Into<String>) -> Note {
        Note {
            type_: EventType::Warning,
            reason: reason.into(),
            action: action.into(),
            note: note.into(),
        }
    }
}

/// Publishes `note` on `obj`; a failure is logged, never returned.
pub async fn publish<K>(recorder: &Recorder, obj: &K, note: Note)
where
    K: Resource<DynamicType = ()>,
{
    let ev = Event {
        type_: note.type_,
        reason: note.reason,
        note: Some(super::text::truncate_bytes(
            &note.note,
            super::text::EVENT_NOTE_BYTES,
        )),
        action: note.action,
        secondary: None,
    };
    if let Err(e) = recorder.publish(&ev, &obj.object_ref(&())).await {
        warn!(error = %e, "cannot record event");
    }
}
