//! The bundled attacks on the host's directories.

use crate::model::{Attack, AttackKind, Class, DirAttack};

/// The bundled attacks of this module.
pub fn attacks() -> Vec<Attack> {
    DirAttack::ALL
        .iter()
        .map(|(a, id, title)| Attack {
            id: (*id).to_owned(),
            class: Class::Filesystem,
            title: (*title).to_owned(),
            source: "bundled".to_owned(),
            kind: AttackKind::Dirs(*a),
        })
        .collect()
}
