//! The bundled second-wall drill attacks.

use crate::model::{Attack, AttackKind, BUNDLED, Class, DrillAttack};

/// The bundled attacks of this module, one per drill attack.
pub fn attacks() -> Vec<Attack> {
    DrillAttack::ALL
        .iter()
        .map(|(a, id, title, _)| Attack {
            id: (*id).to_owned(),
            class: Class::SecondWall,
            title: (*title).to_owned(),
            source: BUNDLED.to_owned(),
            kind: AttackKind::SecondWall(*a),
        })
        .collect()
}
